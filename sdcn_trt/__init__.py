"""sdcn_trt: Stable Diffusion 1.5 + ControlNet (canny), exact to the reference and fast on NVIDIA GPUs."""
from sdcn_trt.config import GenerationConfig
from sdcn_trt.engines import BACKENDS, BackendConfig, backend_available
from sdcn_trt.errors import BackendUnavailableError, CompileError, InputError, SdcnError, WeightsError
from sdcn_trt.pipeline.batched import BatchItem
from sdcn_trt.pipeline.pipeline import ControlNetPipeline, PipelineOutput
from sdcn_trt.scoring.tune import TuneSettings, tune

__version__ = "0.1.0"
__all__ = [
    "BACKENDS", "BackendConfig", "BackendUnavailableError", "BatchItem", "CompileError", "ControlNetPipeline",
    "GenerationConfig", "InputError", "PipelineOutput", "SdcnError", "TuneSettings", "WeightsError", "backend_available",
    "tune",
]
