"""Whether TensorRT can run here (with Polygraphy to build), found without importing anything heavy at package import."""
from __future__ import annotations

import importlib
import importlib.util

INSTALL_HINT = ("pip install 'sdcn_trt[tensorrt]' with NVIDIA's package index reachable "
                "(the PyPI 'tensorrt' packages download from it)")


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why not): TensorRT importable with a real Builder, Polygraphy (which builds the
    engines), and a CUDA GPU visible to torch."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, f"TensorRT is not installed: {INSTALL_HINT}"
    trt = importlib.import_module("tensorrt")
    if not hasattr(trt, "Builder"):  # tensorrt-stubs alone installs a 'tensorrt' of .pyi files
        return False, f"only TensorRT's type stubs are installed, not TensorRT itself: {INSTALL_HINT}"
    if importlib.util.find_spec("polygraphy") is None:
        return False, "TensorRT is installed but Polygraphy, which builds the engines, is not: pip install polygraphy"
    import torch

    if not torch.cuda.is_available():
        return False, "TensorRT is installed but there is no CUDA GPU (torch.cuda.is_available() is False)"
    return True, ""
