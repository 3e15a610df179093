"""Backends behind one runner interface: torch, onnxruntime, tensorrt, inductor."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from sdcn_trt.config import BACKENDS, BackendConfig
from sdcn_trt.engines.base import Runner
from sdcn_trt.errors import BackendUnavailableError, InputError
from sdcn_trt.export.descriptors import NetworkDescriptor, ShapeRange, ShapeSpec

__all__ = ["BACKENDS", "BackendConfig", "backend_available", "create_runner", "require_backend"]


def backend_available(backend: str, device: str | None = None) -> tuple[bool, str]:
    """(usable here, why not): checks the packages without importing them. `device` ("cpu",
    "cuda[:N]") adds what that device needs: a GPU torch can see, and for onnxruntime its CUDA
    execution provider (a CPU build of onnxruntime has none), for inductor Triton and CUDA headers."""
    on_gpu = device is not None and device.startswith("cuda")
    if backend == "torch":
        return cuda_status() if on_gpu else (True, "")
    if backend == "onnxruntime":
        return onnxruntime_status("cuda" if on_gpu else "cpu")
    if backend == "tensorrt":
        from sdcn_trt.engines.tensorrt.support import tensorrt_status

        return tensorrt_status()
    if backend == "inductor":
        from sdcn_trt.engines.inductor.plan import inductor_status

        return inductor_status(device.split(":")[0] if device else None)
    raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def batch_range(config: BackendConfig) -> ShapeRange:
    """The shapes built engines cover: the contest shape at batches 1..config.batch_limit (static at 1)."""
    return ShapeRange.batches(ShapeSpec(), config.batch_limit or 1)


def cuda_status() -> tuple[bool, str]:
    """(usable, why not) for device 'cuda': a GPU that torch can see."""
    import torch

    if torch.cuda.is_available():
        return True, ""
    return False, "device 'cuda' was asked for but torch sees no CUDA GPU here"


def onnxruntime_status(device_type: str = "cpu") -> tuple[bool, str]:
    """(usable, why not): onnxruntime and onnx installed; on 'cuda' also onnxruntime's CUDA
    execution provider (imports onnxruntime to ask it) and a GPU torch can see (I/O binding)."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return False, "onnxruntime is not installed: pip install 'sdcn_trt[onnx]'"
    if device_type != "cuda":
        return True, ""
    import onnxruntime as ort

    providers = list(ort.get_available_providers())
    if "CUDAExecutionProvider" not in providers:
        return False, (f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider (the CPU build: its "
                       f"providers are {', '.join(providers) or 'none'}): pip uninstall onnxruntime && pip install "
                       "onnxruntime-gpu, or use device 'cpu'")
    return cuda_status()


def require_backend(config: BackendConfig) -> None:
    """BackendUnavailableError saying what is missing unless `config.backend` can run on `config.device`."""
    ok, why = backend_available(config.backend, config.device)
    if not ok:
        raise BackendUnavailableError(f"backend {config.backend!r} is unavailable: {why}")
    if config.compile != "off":
        from sdcn_trt.engines.torch import compile_status

        ok, why = compile_status(config.device.split(":")[0])
        if not ok:
            raise BackendUnavailableError(f"compile={config.compile!r} is unavailable: {why}")


def create_runner(descriptor: NetworkDescriptor, config: BackendConfig) -> Runner:
    """The runner of `config.backend` for one network; unavailable backends raise with a fix. A built
    backend's network left out of `config.compiled_networks` gets a torch runner on the same device and
    in the same precision (nothing is built for it), and so does a network the torch backend does not
    torch.compile: the choice is made here, never in the pipeline."""
    require_backend(config)
    if config.backend == "onnxruntime":
        from sdcn_trt.engines.onnxruntime import OnnxRuntimeRunner

        runner: Runner = OnnxRuntimeRunner(descriptor, config)
    elif not config.builds(descriptor.name):  # the torch backend, or a network a built backend leaves to torch
        from sdcn_trt.engines.torch import TorchRunner

        runner = TorchRunner(descriptor, device=config.device, precision=config.precision,
                             compile=config.compile if config.compiles(descriptor.name) else "off",
                             compile_flags=config.compile_flags if config.compiles(descriptor.name) else (),
                             compile_scope=config.compile_scope,
                             cache_dir=Path(config.cache_dir) if config.cache_dir else None)
    elif config.backend == "inductor":
        from sdcn_trt.engines.inductor import InductorRunner
        from sdcn_trt.engines.inductor.plan import InductorSettings

        runner = InductorRunner(descriptor, config, InductorSettings(shape_range=batch_range(config)))
    else:
        from sdcn_trt.engines.tensorrt import TensorRTRunner
        from sdcn_trt.engines.tensorrt.plan import BuildSettings

        runner = TensorRTRunner(descriptor, config, BuildSettings(precision=config.precision,
                                                                  shape_range=batch_range(config)))
    runner.check_finite = config.check_finite
    return runner
