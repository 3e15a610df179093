"""Backends behind one runner interface: torch, onnxruntime, tensorrt, inductor."""
from __future__ import annotations

import importlib.util

from sdcn_trt.config import BACKENDS, BackendConfig
from sdcn_trt.engines.base import Runner
from sdcn_trt.errors import BackendUnavailableError, InputError
from sdcn_trt.export.descriptors import NetworkDescriptor, ShapeRange, ShapeSpec

__all__ = ["BACKENDS", "BackendConfig", "backend_available", "create_runner"]


def backend_available(backend: str, device: str | None = None) -> tuple[bool, str]:
    """(usable here, why not): checks the packages without importing them. `device` ("cpu",
    "cuda[:N]") adds what that device needs where it differs (inductor: Triton and CUDA headers on a GPU)."""
    if backend == "torch":
        return True, ""
    if backend == "onnxruntime":
        ok = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
        return ok, "" if ok else "onnxruntime is not installed: pip install 'sdcn_trt[onnx]'"
    if backend == "tensorrt":
        from sdcn_trt.engines.trt_support import tensorrt_status

        return tensorrt_status()
    if backend == "inductor":
        from sdcn_trt.engines.inductor_plan import inductor_status

        return inductor_status(device.split(":")[0] if device else None)
    raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def batch_range(config: BackendConfig) -> ShapeRange:
    """The shapes built engines cover: the contest shape at batches 1..config.batch_limit (static at 1)."""
    return ShapeRange.batches(ShapeSpec(), config.batch_limit or 1)


def create_runner(descriptor: NetworkDescriptor, config: BackendConfig) -> Runner:
    """The runner of `config.backend` for one network; unavailable backends raise with a fix."""
    ok, why = backend_available(config.backend, config.device)
    if not ok:
        raise BackendUnavailableError(f"backend {config.backend!r} is unavailable: {why}")
    if config.backend == "torch":
        from sdcn_trt.engines.torch import TorchRunner

        runner: Runner = TorchRunner(descriptor, device=config.device, precision=config.precision)
    elif config.backend == "onnxruntime":
        from sdcn_trt.engines.onnxruntime import OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(descriptor, config)
    elif config.backend == "inductor":
        from sdcn_trt.engines.inductor import InductorRunner
        from sdcn_trt.engines.inductor_plan import InductorSettings

        runner = InductorRunner(descriptor, config, InductorSettings(shape_range=batch_range(config)))
    else:
        from sdcn_trt.engines.tensorrt import TensorRTRunner
        from sdcn_trt.engines.trt_plan import BuildSettings

        runner = TensorRTRunner(descriptor, config, BuildSettings(precision=config.precision,
                                                                  shape_range=batch_range(config)))
    runner.check_finite = config.check_finite
    return runner
