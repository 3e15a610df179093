"""GPU-free planning for TensorRT: build settings, cache keys, engine metadata checks."""
from __future__ import annotations

from dataclasses import asdict, dataclass


from sdcn_trt.cache import hash_json
from sdcn_trt.config import PRECISIONS, check_choice
from sdcn_trt.errors import InputError
from sdcn_trt.export.descriptors import Shape, ShapeRange, ShapeSpec

@dataclass(frozen=True)
class BuildSettings:
    """How an engine is built; every field is part of the engine's cache key."""

    precision: str = "fp16"  # "fp16" (TRT 10: FP16 flag on an fp32 ONNX; TRT 11: strongly typed fp16 ONNX) or "fp32"
    optimization_level: int = 3  # builder_optimization_level, 0..5 (the contest's winners used 5)
    workspace_gib: float = 8.0  # MemoryPoolType.WORKSPACE limit
    shape_range: ShapeRange = ShapeRange.static(ShapeSpec())  # the contest shape by default
    refit: bool = False  # BuilderFlag.REFIT: keyed by graph, new weights (LoRA, ControlNet) refit instead of rebuilding

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        if not 0 <= self.optimization_level <= 5:
            raise InputError(f"optimization_level must be in 0..5, got {self.optimization_level}")
        if self.workspace_gib <= 0:
            raise InputError(f"workspace_gib must be > 0, got {self.workspace_gib}")

    @property
    def workspace_bytes(self) -> int:
        return int(self.workspace_gib * 2**30)


@dataclass(frozen=True)
class BuildMode:
    """What the installed TensorRT needs for a precision: which ONNX and which builder flags."""

    onnx_precision: str  # the ONNX file to parse: "fp32" or "fp16"
    strongly_typed: bool  # create the network with NetworkDefinitionCreationFlag.STRONGLY_TYPED
    fp16_flag: bool  # set BuilderFlag.FP16 (weakly typed networks, TRT <= 10)


def build_mode(precision: str, has_fp16_flag: bool) -> BuildMode:
    """TensorRT 10 has BuilderFlag.FP16 and casts an fp32 network itself; TensorRT 11 removed weak
    typing, so an fp16 engine needs an fp16 ONNX parsed as a strongly typed network."""
    if precision == "fp32":
        return BuildMode("fp32", strongly_typed=not has_fp16_flag, fp16_flag=False)
    if has_fp16_flag:
        return BuildMode("fp32", strongly_typed=False, fp16_flag=True)
    return BuildMode("fp16", strongly_typed=True, fp16_flag=False)


@dataclass(frozen=True)
class Platform:
    """What an engine is only valid for."""

    trt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]


def engine_key(onnx_key: str, platform: Platform, settings: BuildSettings, mode: BuildMode,
               profile: dict[str, tuple[Shape, Shape, Shape]]) -> str:
    """ONNX hash + TensorRT version + GPU + profile + flags: anything else changing reuses the engine."""
    return hash_json({"onnx": onnx_key, "platform": asdict(platform), "settings": asdict(settings),
                      "mode": asdict(mode), "profile": profile, "format": 2})  # 2: Polygraphy build, TF32 off


def rebuild_reasons(meta: dict | None, key: str, platform: Platform) -> list[str]:
    """Why a cached engine cannot be used here (empty: it can)."""
    if meta is None:
        return ["no cached engine"]
    reasons = []
    if meta.get("platform", {}).get("trt_version") != platform.trt_version:
        reasons.append(f"built with TensorRT {meta.get('platform', {}).get('trt_version')}, running {platform.trt_version}")
    cached_gpu = meta.get("platform", {})
    if cached_gpu.get("gpu_name") != platform.gpu_name or tuple(cached_gpu.get("compute_capability", ())) != platform.compute_capability:
        reasons.append(f"built for {cached_gpu.get('gpu_name')} (sm {cached_gpu.get('compute_capability')}), "
                       f"running on {platform.gpu_name} (sm {platform.compute_capability})")
    if meta.get("key") != key and not reasons:
        reasons.append("ONNX, profile or build settings changed")
    return reasons
