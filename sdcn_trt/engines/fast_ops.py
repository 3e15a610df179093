"""Fused and pinned operations behind FastPath's switches: GroupNorm (+ SiLU) as one module that reads and
writes channels_last tensors as they are (one kernel when compiled on CUDA), transformer outputs kept
channels_last, attention pinned to one SDPA kernel, and the global CUDA flags (cuDNN benchmark mode, fp16
GEMM accumulation) set for the duration of a call and restored after it."""
from __future__ import annotations

import contextlib
import types
from functools import lru_cache
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sdcn_trt.config import check_choice
from sdcn_trt.errors import InputError

# FastPath.sdpa_backend names -> torch.nn.attention.SDPBackend member names
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}
SDPA_CHOICES = ("auto", *SDPA_BACKENDS)
KERNEL_REFUSALS = ("No available kernel", "No viable backend")  # torch 2.11 / 2.14's words for a refused kernel


def is_nhwc(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels_last (and not also plain contiguous, as 1x1 images are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def group_norm_nhwc(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    """F.group_norm of a channels_last (N, C, H, W) tensor, read and written channels_last.

    CUDA's native GroupNorm takes NCHW only: it copies a channels_last input to NCHW and returns NCHW, and
    the next convolution converts back (two layout copies per GroupNorm). Here the statistics are taken
    over the (N, H*W, G, C/G) view of the NHWC memory, in fp32 as the native kernel does, and the result is
    the same view permuted back: channels_last, no copy. Equal to F.group_norm within float rounding.
    """
    n, c, h, w = x.shape
    y = x.permute(0, 2, 3, 1).reshape(n, h * w, num_groups, c // num_groups).float()  # (N, HW, G, C/G), a view
    var, mean = torch.var_mean(y, dim=(1, 3), keepdim=True, correction=0)  # (N, 1, G, 1) each
    y = ((y - mean) * torch.rsqrt(var + eps)).reshape(n, h, w, c)  # (N, H, W, C)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).permute(0, 3, 1, 2)  # (N, C, H, W) in NHWC memory


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, silu: bool, nhwc: bool) -> torch.Tensor:
    """GroupNorm, then SiLU when `silu`: through F.group_norm (the same ops in the same order as the module
    pair: bit-identical), or, when `nhwc` (a channels_last module) and the input is channels_last, through
    group_norm_nhwc (no layout copies)."""
    if nhwc and is_nhwc(x):
        y = group_norm_nhwc(x, num_groups, weight, bias, eps)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


RECOMPILE_LIMIT = 64  # dynamo's recompiles per function (default 8): a GroupNorm's variants, a ResNet block's shapes


def allow_recompiles() -> None:
    """Raise dynamo's recompile limit to RECOMPILE_LIMIT for the process (never lowers it): one compiled function
    serves many input variants here, and past the limit dynamo would run it eagerly. Set once, not per call."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)


@lru_cache(maxsize=1)
def compiled_group_norm_act() -> Callable[..., torch.Tensor]:
    """group_norm_act compiled once by inductor (one fused Triton kernel on CUDA); dynamic shapes, so every
    GroupNorm of the UNet shares one compiled graph per layout and activation instead of one per shape. Each
    variant is one of dynamo's recompiles of this function: the limit is raised for it, and past the limit
    dynamo runs the function eagerly (not fullgraph, which would raise instead)."""
    allow_recompiles()
    return torch.compile(group_norm_act, dynamic=True)


class FastGroupNorm(nn.GroupNorm):
    """A GroupNorm, followed by SiLU when `silu` (the module pair as one), with the same parameters and
    state_dict keys as the GroupNorm it replaces. `nhwc` (in a channels_last module): channels_last inputs
    stay channels_last. `compiled`: run the inductor-compiled function (CUDA; never while being exported or
    compiled, where the exporter or the outer compile fuses the ops itself)."""

    compiled: bool = False
    silu: bool = True
    nhwc: bool = False

    @classmethod
    def replacing(cls, norm: nn.GroupNorm, compiled: bool, silu: bool = True, nhwc: bool = False) -> "FastGroupNorm":
        fused = cls.__new__(cls)
        fused.__dict__.update(norm.__dict__)  # shares weight / bias and every GroupNorm attribute
        fused.compiled, fused.silu, fused.nhwc = compiled, silu, nhwc
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.num_groups, self.weight, self.bias, self.eps, self.silu, self.nhwc)
        if self.compiled and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return compiled_group_norm_act()(*args)
        return group_norm_act(*args)


class SiLULinear(nn.Linear):
    """silu(x) then the Linear, with the Linear's parameters and keys: a ResnetBlock2D's time-embedding
    projection once its shared `nonlinearity` has moved into its GroupNorms."""

    @classmethod
    def replacing(cls, linear: nn.Linear) -> "SiLULinear":
        fused = cls.__new__(cls)
        fused.__dict__.update(linear.__dict__)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.silu(x))


def fuse_group_norm_silu(module: nn.Module, compiled: bool, nhwc: bool = False) -> int:
    """Rewrite every GroupNorm -> SiLU pair inside `module` in place; returns how many were fused.

    diffusers' ResnetBlock2D ('default' time-embedding norm, SiLU) applies its one `nonlinearity` after
    norm1, after norm2 and to the time embedding: norm1 and norm2 become FastGroupNorm, the time
    projection a SiLULinear (unless it skips the activation), `nonlinearity` the identity. A UNet's
    or VAE decoder's `conv_norm_out` + `conv_act` (GroupNorm, SiLU) become FastGroupNorm + identity.
    `nhwc` (channels_last modules): every other GroupNorm (the transformers' input norms, attention's)
    becomes a FastGroupNorm without SiLU too, so none of them copies its input to NCHW.
    """
    from diffusers.models.resnet import ResnetBlock2D

    fused = 0
    for block in list(module.modules()):
        if (isinstance(block, ResnetBlock2D) and block.time_embedding_norm == "default"
                and type(block.nonlinearity) is nn.SiLU and type(block.norm1) is nn.GroupNorm
                and type(block.norm2) is nn.GroupNorm):
            block.norm1 = FastGroupNorm.replacing(block.norm1, compiled, nhwc=nhwc)
            block.norm2 = FastGroupNorm.replacing(block.norm2, compiled, nhwc=nhwc)
            if block.time_emb_proj is not None and not block.skip_time_act:
                block.time_emb_proj = SiLULinear.replacing(block.time_emb_proj)
            block.nonlinearity = nn.Identity()
            fused += 2
        norm, act = getattr(block, "conv_norm_out", None), getattr(block, "conv_act", None)
        if type(norm) is nn.GroupNorm and type(act) is nn.SiLU:
            block.conv_norm_out = FastGroupNorm.replacing(norm, compiled, nhwc=nhwc)
            block.conv_act = nn.Identity()
            fused += 1
    if nhwc:
        for block in list(module.modules()):
            for name, child in list(block.named_children()):
                if type(child) is nn.GroupNorm:
                    setattr(block, name, FastGroupNorm.replacing(child, compiled, silu=False, nhwc=True))
    return fused


def _continuous_output_nhwc(self: Any, hidden_states: torch.Tensor, residual: torch.Tensor, batch_size: int,
                            height: int, width: int, inner_dim: int) -> torch.Tensor:
    """Transformer2DModel._get_output_for_continuous_inputs without its `.contiguous()`: the permuted
    (N, HW, C) -> (N, C, H, W) view is already channels_last, which the projection and the residual add
    read as it is (diffusers' copy to NCHW is one layout copy per transformer, and cuDNN converts back)."""
    if not self.use_linear_projection:
        hidden_states = self.proj_out(hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2))
    else:
        hidden_states = self.proj_out(hidden_states).reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return hidden_states + residual


def keep_transformer_outputs_nhwc(module: nn.Module) -> int:
    """Every Transformer2DModel on continuous inputs inside `module` hands its output on channels_last
    (the instance's _get_output_for_continuous_inputs replaced); returns how many. Only for channels_last
    modules: on NCHW ones the view would be the layout change instead."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    blocks = [m for m in module.modules() if isinstance(m, Transformer2DModel) and m.is_input_continuous
              and hasattr(m, "_get_output_for_continuous_inputs")]
    for block in blocks:
        block._get_output_for_continuous_inputs = types.MethodType(_continuous_output_nhwc, block)
    return len(blocks)


class TextProjection(nn.Linear):
    """A cross-attention's K/V projection (to_k, to_v or the fused to_kv) of the text embedding, with the same
    parameters and keys as the Linear it replaces. The text is the same at every step of an image, so
    `prepare(text)` projects it once into a buffer kept per shape (a captured graph may hold it), and while
    `prepared` is set the module returns that buffer instead of projecting again: the same numbers, one GEMM
    per image instead of one per step."""

    prepared: torch.Tensor | None = None  # what forward returns instead of projecting (None: it projects)
    ready: torch.Tensor | None = None  # the last prepare's buffer
    kept: dict[tuple[Any, ...], torch.Tensor]  # (shape, dtype, device) -> its buffer

    @classmethod
    def replacing(cls, linear: nn.Linear) -> "TextProjection":
        kept = cls.__new__(cls)
        kept.__dict__.update(linear.__dict__)
        kept.prepared, kept.ready, kept.kept = None, None, {}
        return kept

    def prepare(self, text: torch.Tensor) -> torch.Tensor:
        """Project `text` (N, 77, D) into this module's buffer for that shape and dtype (kept for the module's
        life: a graph captured over it reads it at every replay); returns it, and it is `ready`."""
        out = F.linear(text, self.weight, self.bias)  # (N, 77, out_features)
        buffer = self.kept.get((out.shape, out.dtype, out.device))
        if buffer is None:
            buffer = self.kept[(out.shape, out.dtype, out.device)] = torch.empty_like(out)
        buffer.copy_(out)
        self.ready = buffer
        return buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prepared if self.prepared is not None else super().forward(x)


def keep_text_projections(module: nn.Module) -> list[TextProjection]:
    """Make the K/V projections of every cross-attention inside `module` that projects the text embedding as
    it is (no cross-attention norm) TextProjections, in place; returns them. Call after fusing QKV (to_kv)."""
    kept = []
    for attn in attention_modules(module):
        if not attn.is_cross_attention or attn.norm_cross:
            continue
        for name in ("to_kv", "to_k", "to_v"):
            linear = getattr(attn, name, None)
            if type(linear) is nn.Linear and not (name != "to_kv" and hasattr(attn, "to_kv")):
                setattr(attn, name, TextProjection.replacing(linear))
                kept.append(getattr(attn, name))
    return kept


def attention_modules(module: nn.Module) -> list[Any]:  # diffusers Attention (imported lazily)
    """Every diffusers Attention inside `module` (UNet, ControlNet, VAE mid block); CLIP has none."""
    from diffusers.models.attention_processor import Attention

    return [m for m in module.modules() if isinstance(m, Attention)]


def sdpa_backend(name: str) -> Any:  # -> torch.nn.attention.SDPBackend
    """The SDPBackend member for a kernel name other than 'auto'."""
    check_choice("sdpa_backend", name, SDPA_CHOICES)
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, SDPA_BACKENDS[name])


def parse_sdpa_kernels(spec: str) -> dict[int | None, str]:
    """FastPath.sdpa_backend -> {head size: kernel}, None keying the kernel for every other head size.

    'auto' -> {} (torch chooses per call); 'flash' -> {None: 'flash'} (one kernel for all); per head size:
    '40=flash,80=efficient,160=cudnn' (head sizes not named: torch chooses), or with a kernel for the rest
    first: 'efficient,40=flash'. An InputError names the bad entry and what is valid."""
    kernels: dict[int | None, str] = {}
    for entry in (part.strip() for part in spec.split(",")):
        size_text, _, kernel = entry.rpartition("=")
        size: int | None = None
        if size_text:
            if not size_text.strip().isdecimal() or int(size_text) == 0:
                raise InputError(f"sdpa_backend {spec!r}: head size {size_text.strip()!r} in {entry!r} is not a "
                                 "positive whole number; write head=kernel, e.g. '40=flash,80=efficient'")
            size = int(size_text)
        kernel = kernel.strip()
        where = "sdpa_backend" if size is None else f"sdpa_backend kernel for head size {size}"
        check_choice(where, kernel, SDPA_CHOICES)
        if size in kernels:
            raise InputError(f"sdpa_backend {spec!r} names " + ("a kernel for the other head sizes" if size is None
                             else f"head size {size}") + " twice")
        kernels[size] = kernel
    if kernels.get(None) == "auto":  # 'auto' for the other sizes is what naming no kernel for them means
        del kernels[None]
    # '40=auto' says something only beside a kernel for the other sizes (then 40 alone is left to torch)
    return {size: kernel for size, kernel in kernels.items() if kernel != "auto" or None in kernels}


def sdpa_kernels_spelling(kernels: dict[int | None, str]) -> str:
    """The canonical FastPath.sdpa_backend for parse_sdpa_kernels' result: the kernel for other head sizes
    first, then head sizes in increasing order ('auto' for none), so equal choices compare and key equal."""
    entries = [kernels[None]] if None in kernels else []
    entries += [f"{size}={kernels[size]}" for size in sorted(s for s in kernels if s is not None)]
    return ",".join(entries) or "auto"


def sdpa_kernel_for(kernels: dict[int | None, str], head_size: int) -> str:
    """The kernel an attention of `head_size` is pinned to ('auto': none, torch chooses)."""
    return kernels.get(head_size, kernels.get(None, "auto"))


class PinnedSdpa:
    """A diffusers attention processor whose scaled_dot_product_attention may only use one kernel
    (torch.nn.attention.sdpa_kernel). When that kernel cannot take the call, torch's RuntimeError comes
    with the kernel and the head size in front."""

    def __init__(self, inner: Any, kernel: str, head_size: int):
        self.inner, self.kernel, self.head_size = inner, kernel, head_size
        self.backend = sdpa_backend(kernel)

    def __call__(self, attn: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        from torch.nn.attention import sdpa_kernel

        try:
            with sdpa_kernel(self.backend):
                return self.inner(attn, *args, **kwargs)
        except torch.OutOfMemoryError:
            raise  # not the kernel's refusal: callers turn it into DeviceMemoryError
        except RuntimeError as exc:
            if not any(refusal in str(exc) for refusal in KERNEL_REFUSALS):
                raise
            raise RuntimeError(f"attention pinned to the {self.kernel!r} SDPA kernel (head size {self.head_size}, "
                               f"FastPath.sdpa_backend) cannot run here: {exc}") from exc


@contextlib.contextmanager
def cuda_flags(cudnn_benchmark: bool, fp16_accumulation: bool) -> Iterator[None]:
    """cuDNN benchmark mode and fp16 GEMM accumulation for one call; both are process-wide torch
    settings, so they are restored afterwards (another runner's calls keep their own)."""
    matmul = torch.backends.cuda.matmul
    before = torch.backends.cudnn.benchmark, getattr(matmul, "allow_fp16_accumulation", False)
    torch.backends.cudnn.benchmark = cudnn_benchmark or before[0]
    if fp16_accumulation:
        matmul.allow_fp16_accumulation = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before[0]
        if fp16_accumulation:
            matmul.allow_fp16_accumulation = before[1]
