"""The torch backend's runner: the descriptor's module, eager or through torch.compile, fp32 or fp16, CPU
or CUDA, and the fast CUDA path every GPU backend builds on (SDPA attention, fused QKV, channels_last,
GroupNorm+SiLU fused, a pinned SDPA kernel, cuDNN benchmark mode, fp16 GEMM accumulation)."""
from __future__ import annotations

import copy
import importlib.util
import os
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdcn_trt.engines.base import Runner
from sdcn_trt.engines.fast_ops import (PinnedSdpa, TextProjection, allow_recompiles, attention_modules, cuda_flags,
                                       fuse_group_norm_silu, keep_text_projections, keep_transformer_outputs_nhwc,
                                       parse_sdpa_kernels, sdpa_kernel_for, sdpa_kernels_spelling)
from sdcn_trt.config import COMPILE_FLAGS, COMPILE_MODES, COMPILE_SCOPES, PRECISIONS, check_choice, check_compile_flags
from sdcn_trt.errors import BackendUnavailableError, CompileError, InputError
from sdcn_trt.export.descriptors import NetworkDescriptor

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # keyed by config.PRECISIONS


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, with a clear error when CUDA is asked for and absent."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("device 'cuda' was asked for but torch sees no CUDA GPU here")
    return device


def resolve_dtype(precision: str) -> torch.dtype:
    check_choice("precision", precision, PRECISIONS)
    return DTYPES[precision]


@dataclass(frozen=True)
class FastPath:
    """Module changes for speed, applied to a private copy before it runs (or is compiled).

    On by default only on CUDA in fp16 (`default_for`), so CPU fp32 results stay bit-identical to the
    reference. There the default holds what a GPU run measured faster: SDPA, fused QKV, channels_last and
    GroupNorm+SiLU (one H200 step inside a CUDA graph: 11.8 -> 7.8 ms with the last two, benchmarks/results/
    gpu-h200-20261204/). `sdpa_backend`, `cudnn_benchmark`, `fp16_accumulation` and `cross_kv` stay off until
    a GPU run measures them (`python -m benchmarks.fast_path`); `cudnn_benchmark` and `fp16_accumulation` need
    CUDA.
    """

    sdpa: bool = False  # every diffusers Attention on AttnProcessor2_0 (F.scaled_dot_product_attention)
    fuse_qkv: bool = False  # one to_qkv GEMM per self-attention, one to_kv per cross-attention
    channels_last: bool = False  # NHWC weights and 4-D inputs: cuDNN's fastest fp16 convolutions, no NCHW copies
    # GroupNorm + SiLU as one module, one compiled kernel on CUDA; with channels_last every GroupNorm reads and
    # writes NHWC (CUDA's own GroupNorm copies NHWC inputs to NCHW) (fast_ops)
    gn_silu: bool = False
    # the SDPA kernel attention may use: auto (torch chooses per call) | flash | efficient | cudnn | math, or one
    # per head size ('40=flash,80=efficient,160=cudnn'; fast_ops.parse_sdpa_kernels); kept in canonical spelling
    sdpa_backend: str = "auto"
    cudnn_benchmark: bool = False  # cuDNN times its algorithms per shape once (the contest shape is fixed)
    # an image's constant inputs made ready once (Runner.prepare) instead of at every step: every cross-attention's
    # K/V of the text (fast_ops.TextProjection) and the text, hints and scales cast to the dtype and layout
    cross_kv: bool = False
    fp16_accumulation: bool = False  # cuBLAS fp16 GEMMs accumulate in fp16 (faster, less exact; CUDA only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sdpa_backend", sdpa_kernels_spelling(parse_sdpa_kernels(self.sdpa_backend)))
        if self.sdpa_backend != "auto" and not self.sdpa:
            raise InputError(f"sdpa_backend={self.sdpa_backend!r} pins a kernel of F.scaled_dot_product_attention, "
                             "which attention only calls with sdpa=True; set sdpa=True or sdpa_backend='auto'")

    def check_device(self, device: torch.device) -> None:
        """InputError when a CUDA-only switch is asked for on another device."""
        cuda_only = [name for name in ("cudnn_benchmark", "fp16_accumulation") if getattr(self, name)]
        if cuda_only and device.type != "cuda":
            raise InputError(f"FastPath {' and '.join(cuda_only)} only act on CUDA, not on device {device.type!r}; "
                             "switch them off for this device")

    @classmethod
    def default_for(cls, device: torch.device, dtype: torch.dtype) -> "FastPath":
        """The switches on by default: on CUDA in fp16 the four the H200 measured faster, elsewhere none (CPU
        and fp32 results stay bit-identical to the reference modules)."""
        if device.type == "cuda" and dtype == torch.float16:
            return cls(sdpa=True, fuse_qkv=True, channels_last=True, gn_silu=True)
        return cls()


def apply_fast_path(module: nn.Module, fast: FastPath) -> nn.Module:
    """Apply `fast` to `module` in place (call it on a copy) and return it. diffusers' own
    `fuse_qkv_projections` exists on the UNet and the VAE only; this reaches the ControlNet too."""
    if fast.sdpa or fast.fuse_qkv:
        kernels = parse_sdpa_kernels(fast.sdpa_backend)
        from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

        with torch.no_grad():
            for attn in attention_modules(module):
                if fast.fuse_qkv:
                    attn.fuse_projections(fuse=True)
                processor = FusedAttnProcessor2_0() if fast.fuse_qkv else AttnProcessor2_0()
                head_size = attn.inner_dim // attn.heads  # as SDPA sees it
                kernel = sdpa_kernel_for(kernels, head_size)
                attn.set_processor(processor if kernel == "auto" else PinnedSdpa(processor, kernel, head_size))
    if fast.cross_kv:  # after fuse_qkv: the fused to_kv is what gets kept
        keep_text_projections(module)
    if fast.gn_silu:
        held = next((p for p in module.parameters()), None)
        fuse_group_norm_silu(module, compiled=held is not None and held.device.type == "cuda", nhwc=fast.channels_last)
    if fast.channels_last:
        module = module.to(memory_format=torch.channels_last)
        keep_transformer_outputs_nhwc(module)
    return module


def prepare_module(descriptor: NetworkDescriptor, device: torch.device, dtype: torch.dtype,
                   fast: FastPath | None = None, private: bool = False) -> nn.Module:
    """The descriptor's module on `device` in `dtype` with the fast path applied; the shared CPU
    components are left untouched (a copy is made whenever anything would change them: components
    already held in `dtype` on `device` are used as they are, unless the caller will change the module
    itself: `private`)."""
    fast = FastPath.default_for(device, dtype) if fast is None else fast
    fast.check_device(device)
    module = descriptor.build_module()
    held = next((p for p in module.parameters() if p.is_floating_point()), None)  # fp16 components: fp16
    if private or held is None or held.dtype != dtype or held.device != device or fast != FastPath():
        module = copy.deepcopy(module)  # .to() and the fast path work in place
    return apply_fast_path(module.to(device, dtype), fast)  # on the device first: gn_silu compiles for CUDA only


def cpp_compiler() -> str:
    """The C++ compiler inductor calls: $CXX, else g++."""
    return os.environ.get("CXX") or "g++"


def cpp_compiler_missing(who: str) -> str:
    """'' when the C++ compiler inductor calls is on PATH, else what is missing, for `who` (the inductor
    backend and torch.compile share this check)."""
    if shutil.which(cpp_compiler()) is not None:
        return ""
    return (f"{who} needs a C++ compiler and '{cpp_compiler()}' was not found on PATH: install g++ "
            "(apt-get install g++) or set CXX to one")


def triton_missing(who: str) -> str:
    """'' when Triton (inductor's GPU kernels) is installed, else what is missing, for `who`."""
    return "" if importlib.util.find_spec("triton") is not None else (
        f"{who} needs Triton, which is not installed: pip install triton")


def compile_status(device_type: str) -> tuple[bool, str]:
    """(usable, what is missing) for torch.compile's inductor: a C++ compiler for CPU kernels, Triton and
    the C compiler its launcher is built with for CUDA kernels (a missing one only shows at the first
    call otherwise, minutes into a run)."""
    if device_type == "cuda":
        missing = triton_missing("torch.compile on a GPU")
        if missing:
            return False, missing
        c_compiler = os.environ.get("CC") or next((c for c in ("gcc", "clang") if shutil.which(c)), None)
        if c_compiler is None or shutil.which(c_compiler) is None:  # Triton builds its launcher with one
            missing = f"{c_compiler!r} was not found on PATH" if c_compiler else "neither gcc nor clang is on PATH"
            return False, (f"torch.compile on a GPU needs a C compiler for Triton's launcher and {missing}: "
                           "install gcc (apt-get install gcc) or set CC to one")
        return True, ""
    missing = cpp_compiler_missing("torch.compile on the CPU")
    return not missing, missing


class TorchRunner(Runner):
    """Torch, eager or through torch.compile (`compile`: a COMPILE_MODES mode; it compiles at the first call
    and again for a new input shape). Float inputs are cast to the runner's dtype; float outputs come back
    float32."""

    def __init__(self, descriptor: NetworkDescriptor, device: str | torch.device = "cpu", precision: str = "fp32",
                 fast: FastPath | None = None, compile: str = "off", compile_flags: tuple[str, ...] = (),
                 compile_scope: str = "whole", cache_dir: Path | None = None):
        super().__init__(descriptor)
        check_choice("compile mode", compile, COMPILE_MODES)
        self._device = resolve_device(device)
        self.dtype = resolve_dtype(descriptor.precision_for(precision))
        self.fast = FastPath.default_for(self._device, self.dtype) if fast is None else fast
        self.compile = compile
        self.compile_flags = check_compile_flags(compile_flags)  # COMPILE_FLAGS added to the mode's inductor settings
        check_choice("compile_scope", compile_scope, COMPILE_SCOPES)
        self.compile_scope = compile_scope  # torch.compile the whole module, or its blocks apart (compile_regions)
        if self.compile_flags and compile == "off":
            raise InputError(f"compile_flags {', '.join(self.compile_flags)} need a torch.compile mode, not compile='off'")
        self.module: Any = None  # the prepared nn.Module, or torch.compile's wrapper of it
        self.cache_dir = cache_dir  # the sdcn_trt cache torch.compile's caches go in (None: $SDCN_TRT_CACHE)
        self.compile_cache: Path | None = None  # where they are (engines.compile_cache), once activated
        self._artifacts_saved = False
        self._text_projections: list[TextProjection] = []  # FastPath.cross_kv's modules (prepare fills them)
        # FastPath.cross_kv: {input name: (the tensor prepare was given, its ready copy)}; buffers kept per shape;
        # constants handed to prepare before activation (prepared at the first call)
        self._prepared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._kept_inputs: dict[tuple[Any, ...], torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self._device

    def activate_impl(self) -> None:
        if self.compile != "off":  # the compiled networks' caches, kept for the next process
            from sdcn_trt.engines.compile_cache import use_compile_cache

            try:
                self.compile_cache = use_compile_cache(self._device, self.cache_dir)
            except OSError as exc:  # a read-only or another user's cache: compile as torch would, nothing kept
                logger.warning("compile cache: cannot use %s (%s); torch.compile keeps its own caches this time",
                               self.cache_dir or "the sdcn_trt cache", exc)
        blocks = self.compile != "off" and self.compile_scope == "blocks"  # compiled in place: on a copy of its own
        module: Any = prepare_module(self.descriptor, self._device, self.dtype, self.fast, private=blocks)
        self._text_projections = [m for m in module.modules() if isinstance(m, TextProjection)]
        if self.compile != "off":  # compiled at the first call, where the input shapes are known
            arguments = compile_arguments(self.compile, self.compile_flags)
            allow_recompiles()  # each block kind compiles once per input shape: a ResNet block meets ~20 shapes
            if blocks:
                compile_regions(module, arguments)
            else:
                module = torch.compile(module, **arguments)
        self.module = module

    def deactivate_impl(self) -> None:
        self.module = None
        self._text_projections, self._prepared, self._kept_inputs, self._pending = [], {}, {}, None

    def prepare(self, constants: dict[str, torch.Tensor]) -> None:
        """FastPath.cross_kv: the image's constant inputs made ready once — each cast to the runner's dtype and
        layout, the text embedding projected through every cross-attention's K/V — into buffers kept per
        shape; a call given these very tensors uses them (others are cast and projected as usual). Before the
        runner is active (it activates at its first call) the constants wait for that call."""
        if not self.fast.cross_kv:
            return
        named = {n: t for n, t in constants.items() if n in self.descriptor.input_names}
        if not self.is_active:
            self._pending = named
            return
        self._prepare_now(named)

    def _prepare_now(self, constants: dict[str, torch.Tensor]) -> None:
        self._pending = None
        self._prepared = {}
        with torch.inference_mode():
            for name, value in constants.items():
                ready = self._as_argument(value)
                key = (name, ready.shape, ready.dtype)
                buffer = self._kept_inputs.get(key)
                if buffer is None:  # kept for the runner's life: a graph captured over it reads it at every replay
                    buffer = self._kept_inputs[key] = torch.empty_like(ready)
                buffer.copy_(ready)
                self._prepared[name] = (value, buffer)
            text = self._prepared.get("text_embeddings")
            if text is not None:
                for projection in self._text_projections:
                    projection.prepared = projection.prepare(text[1])  # (2B, 77, 2 x inner) with fused QKV

    def _as_argument(self, value: torch.Tensor) -> torch.Tensor:
        """An input as the module takes it: on the device, floats in the runner's dtype, (N, C, H, W) inputs
        in NHWC with channels_last (no layout copy before the first convolution)."""
        value = cast_input(value, self._device, self.dtype)
        return value.contiguous(memory_format=torch.channels_last) if self.fast.channels_last and value.dim() == 4 else value

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.module is not None
        if self._pending is not None:
            self._prepare_now(self._pending)
        prepared = self._prepared
        args = [prepared[n][1] if n in prepared and feed[n] is prepared[n][0] else self._as_argument(feed[n])
                for n in self.descriptor.input_names]
        if self._text_projections:  # the projections serve only calls on the text they were prepared from
            text = prepared.get("text_embeddings")
            use = text is not None and feed.get("text_embeddings") is text[0]
            if use != (self._text_projections[0].prepared is not None):
                for projection in self._text_projections:
                    projection.prepared = projection.ready if use else None
        with torch.inference_mode(), cuda_flags(self.fast.cudnn_benchmark, self.fast.fp16_accumulation):
            out = self.module(*args) if self.compile == "off" else self._compiled_call(args)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float() for n, o in zip(self.descriptor.output_names, outputs, strict=True)}

    def _compiled_call(self, args: list[torch.Tensor]) -> Any:
        """The torch.compile'd module's call; a failure of dynamo or inductor (compiling at a first call or a
        new shape; inductor's InductorError is a TorchDynamoException too) becomes one CompileError."""
        import torch._dynamo.exc

        try:
            out = self.module(*args)
        except torch._dynamo.exc.TorchDynamoException as exc:
            shapes = ", ".join(f"{n} {tuple(a.shape)}" for n, a in zip(self.descriptor.input_names, args, strict=True))
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CompileError(f"torch.compile (mode {self.compile!r}) failed on network '{self.name}' for inputs "
                               f"{shapes}: {type(exc).__name__}: {cause[:500]}; compile='off' runs it without torch.compile") from exc
        if not self._artifacts_saved and self.compile_cache is not None:  # after the first compile: for the next process
            from sdcn_trt.cache import hash_json
            from sdcn_trt.engines.compile_cache import compiled_anything_new, save_artifacts

            self._artifacts_saved = True
            if not compiled_anything_new():  # everything came from the cache: nothing new to keep
                return out
            what = {"network": self.name, "mode": self.compile, "flags": list(self.compile_flags),
                    "scope": self.compile_scope, "dtype": str(self.dtype),
                    "fast": repr(self.fast)}
            try:
                save_artifacts(self.compile_cache, f"{self.name}-{hash_json(what)[:12]}", what)
            except Exception as exc:  # a full disk, a refusal of torch: the next process compiles again, this run goes on
                logger.warning("compile cache: could not save torch.compile's artifacts in %s: %s", self.compile_cache, exc)
        return out


def compile_arguments(mode: str, flags: tuple[str, ...]) -> dict[str, Any]:
    """torch.compile's keyword arguments for a COMPILE_MODES mode plus COMPILE_FLAGS: the mode alone, or (torch
    takes a mode or options, not both) the mode's own inductor options with the flags' settings over them."""
    if not flags:
        return {"mode": None if mode == "default" else mode}
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode))  # "default": {}
    for flag in flags:
        options.update(COMPILE_FLAGS[flag])
    return {"options": options}


def compile_regions(module: nn.Module, arguments: dict[str, Any]) -> int:
    """Regional compilation: torch.compile each transformer, ResNet block, down- and upsampler inside
    `module` in place (nn.Module.compile), the glue between them left eager; returns how many. Blocks of one
    kind with the same input shapes share one compiled graph (parameters are graph inputs), so the ControlNet's
    blocks reuse the UNet's compiles and a cold compile is many small graphs instead of one large one."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    regions = [m for m in module.modules() if isinstance(m, (Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D))]
    for region in regions:
        region.compile(**arguments)
    return len(regions)


def cast_input(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`x` on `device`; floats in `dtype`, integers as they are (no host sync when already there)."""
    x = x.to(device, non_blocking=True)
    return x.to(dtype) if x.is_floating_point() else x
