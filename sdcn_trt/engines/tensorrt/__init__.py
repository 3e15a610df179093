"""The TensorRT backend (plan: GPU-free profiles, keys and rebuild rules; refit: new weights into a built engine; support: what is installed; runner: Polygraphy builds, the engine cache and the Runner)."""
from sdcn_trt.engines.tensorrt.runner import TensorRTRunner

__all__ = ["TensorRTRunner"]
