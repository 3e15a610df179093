"""Backends behind one runner interface: torch, onnxruntime, tensorrt."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from sdcn_trt.engines.base import Runner
from sdcn_trt.errors import BackendUnavailableError, InputError
from sdcn_trt.export.descriptors import NetworkDescriptor

BACKENDS = ("torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BackendConfig:
    """Which backend runs the networks, where, and in what precision."""

    backend: str = "torch"  # one of BACKENDS
    device: str = "cpu"  # "cpu" or "cuda[:N]"
    dtype: str = "fp32"  # "fp32" (the reference) or "fp16"
    cache_dir: str | None = None  # exported ONNX / engines; default $SDCN_TRT_CACHE
    cuda_graph: str = "off"  # "step": one graph per step; "loop": all steps + decode in one graph (CPU: same static loop, eager)
    check_finite: bool = False  # raise NonFiniteOutputError naming the network that produced NaN/Inf

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.dtype not in ("fp32", "fp16"):
            raise InputError(f"unknown dtype {self.dtype!r}; choose fp32 or fp16")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InputError(f"unknown device {self.device!r}; use 'cpu' or 'cuda[:N]'")
        if self.cuda_graph not in ("off", "step", "loop"):
            raise InputError(f"unknown cuda_graph mode {self.cuda_graph!r}; choose off, step or loop")
        if self.cuda_graph == "step" and not self.device.startswith("cuda"):
            raise InputError("cuda_graph='step' needs device='cuda'")

    def cache_path(self) -> Path:
        from sdcn_trt.cache import cache_root

        return Path(self.cache_dir) if self.cache_dir else cache_root()


def backend_available(backend: str) -> tuple[bool, str]:
    """(usable here, why not): checks the packages without importing them."""
    if backend == "torch":
        return True, ""
    if backend == "onnxruntime":
        ok = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
        return ok, "" if ok else "onnxruntime is not installed: pip install 'sdcn_trt[onnx]'"
    if backend == "tensorrt":
        from sdcn_trt.engines.trt_support import tensorrt_status

        return tensorrt_status()
    raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def create_runner(descriptor: NetworkDescriptor, config: BackendConfig) -> Runner:
    """The runner of `config.backend` for one network; unavailable backends raise with a fix."""
    ok, why = backend_available(config.backend)
    if not ok:
        raise BackendUnavailableError(f"backend {config.backend!r} is unavailable: {why}")
    if config.backend == "torch":
        from sdcn_trt.engines.torch import TorchRunner

        runner: Runner = TorchRunner(descriptor, device=config.device, dtype=config.dtype)
    elif config.backend == "onnxruntime":
        from sdcn_trt.engines.onnxruntime import OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(descriptor, config)
    else:
        from sdcn_trt.engines.tensorrt import TensorRTRunner

        runner = TensorRTRunner(descriptor, config)
    runner.check_finite = config.check_finite
    return runner
