"""One descriptor per network: names, dtypes, shapes, dynamic axes, profiles and sample inputs.

Everything is derived from the model's own configs and one ShapeSpec; export, engine builds,
buffer allocation, feeds and shape checks all read these and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from sdcn_trt.models import networks
from sdcn_trt.models.components import Components
from sdcn_trt.config import CONTEST_HEIGHT, CONTEST_WIDTH, NETWORKS
from sdcn_trt.errors import InputError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeSpec:
    """One workload shape: images per call, image size in pixels, CFG multiplier."""

    batch: int = 1
    height: int = CONTEST_HEIGHT
    width: int = CONTEST_WIDTH
    cfg: int = 2  # [uncond, cond] evaluated as one batch

    def __post_init__(self) -> None:
        for name in ("batch", "height", "width", "cfg"):
            if getattr(self, name) < 1:
                raise InputError(f"ShapeSpec.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ShapeRange:
    """A min/opt/max range of ShapeSpecs: one optimisation profile for every network."""

    min: ShapeSpec
    opt: ShapeSpec
    max: ShapeSpec

    @classmethod
    def static(cls, spec: ShapeSpec) -> "ShapeRange":
        return cls(spec, spec, spec)

    @classmethod
    def batches(cls, spec: ShapeSpec, max_batch: int) -> "ShapeRange":
        """Batches 1..max_batch of `spec`'s size, tuned for max_batch (batched runs); static when max_batch is 1."""
        if max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {max_batch}")
        top = ShapeSpec(max_batch, spec.height, spec.width, spec.cfg)
        return cls(ShapeSpec(1, spec.height, spec.width, spec.cfg), top, top)

    @classmethod
    def dynamic(cls, opt: ShapeSpec, max_batch: int = 4, min_side: int = 256, max_side: int = 768) -> "ShapeRange":
        return cls(ShapeSpec(1, min_side, min_side, opt.cfg), opt, ShapeSpec(max_batch, max_side, max_side, opt.cfg))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    dynamic_axes: dict[int, str]  # axis -> symbolic name, for export


@dataclass(frozen=True)
class ModelDims:
    """The sizes every descriptor needs, read off the model's own configs (never typed in)."""

    latent_channels: int  # UNet input channels (4)
    vae_scale: int  # pixels per latent (8)
    text_len: int  # CLIP positions (77)
    text_dim: int  # CLIP width (768 for SD1.5)
    vocab_size: int  # sample token ids stay below it
    num_scales: int  # ControlNet residuals: down blocks + mid block (13 for SD1.5)
    num_controlnets: int  # ControlNets whose residuals are summed (Multi-ControlNet), each with its own control image
    hint_channels: int  # channels of the control image (3)
    hint_embedding_channels: int  # channels of the embedded hint (ControlNet's first block width)
    image_channels: int  # VAE output channels (3)
    residual_layout: tuple[tuple[int, int], ...]  # (channels, downsampling factor) of each residual
    deep_channels: int  # channels of DeepCache's deep feature: the input of the UNet's last up block
    shallow_skips: int  # skip connections the last up block reads (residuals a shallow step needs)

    @classmethod
    def of(cls, components: Components) -> "ModelDims":
        net = components.peek  # configs and structure only: the weights may not be loaded (yet)
        unet, text, control = net("unet").config, net("text_encoder").config, net("controlnet").config
        convs = list(net("controlnet").controlnet_down_blocks) + [net("controlnet").controlnet_mid_block]
        return cls(
            latent_channels=int(unet.in_channels), vae_scale=components.vae_scale_factor,
            text_len=int(text.max_position_embeddings), text_dim=int(text.hidden_size),
            vocab_size=int(text.vocab_size), num_scales=len(convs), num_controlnets=components.num_controlnets,
            hint_channels=int(control.conditioning_channels),
            hint_embedding_channels=int(control.block_out_channels[0]),
            image_channels=int(net("vae").config.out_channels),
            residual_layout=tuple((int(c.out_channels), f) for c, f in zip(convs, _residual_factors(control), strict=True)),
            deep_channels=int(unet.block_out_channels[1]) if len(unet.block_out_channels) > 1 else 0,
            shallow_skips=len(net("unet").up_blocks[-1].resnets),
        )

    def latent_size(self, spec: ShapeSpec) -> tuple[int, int]:
        if spec.height % self.vae_scale or spec.width % self.vae_scale:
            s = self.vae_scale
            near = f"{max(s, round(spec.height / s) * s)}x{max(s, round(spec.width / s) * s)}"
            raise InputError(f"image size {spec.height}x{spec.width} (height x width) is not a multiple of the VAE's "
                             f"{s} on both sides; e.g. {near}")
        return spec.height // self.vae_scale, spec.width // self.vae_scale


def per_controlnet(name: str, count: int) -> list[str]:
    """Tensor names of one input per ControlNet: name, name_1, name_2, ... (the first keeps the plain name)."""
    return [name] + [f"{name}_{k}" for k in range(1, count)]


def _residual_factors(config) -> list[int]:
    """Spatial downsampling of each ControlNet residual: per level `layers_per_block` outputs and a
    downsampler (but after the last level), then the mid block."""
    levels, per_level = len(config.block_out_channels), config.layers_per_block
    factors = [1]  # conv_in
    for level in range(levels):
        factors += [2**level] * per_level
        if level < levels - 1:
            factors.append(2 ** (level + 1))
    return factors + [2 ** (levels - 1)]


class NetworkDescriptor:
    """Base class: a subclass names its tensors and maps a ShapeSpec to each tensor's shape."""

    name: str = ""
    module_class: Callable[[Components], nn.Module]
    fp32_only: bool = False  # runs in fp32 whatever precision is asked (CLIP: its causal mask overflows fp16)

    def __init__(self, components: Components):
        self.components = components
        self.dims = ModelDims.of(components)

    # -- subclass interface -------------------------------------------------------------------
    def inputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def outputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        """Shape of every input and output for `spec`."""
        raise NotImplementedError

    # -- derived ------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs()]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs()]

    def precision_for(self, precision: str) -> str:
        """The precision this network runs in when `precision` is asked for."""
        return "fp32" if self.fp32_only else precision

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes for t in self.inputs() + self.outputs() if t.dynamic_axes}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {t.name: t.dtype for t in self.inputs() + self.outputs()}

    def profile(self, shape_range: ShapeRange) -> dict[str, tuple[Shape, Shape, Shape]]:
        """(min, opt, max) shape of every input: an optimisation profile."""
        lo, opt, hi = (self.shapes(s) for s in (shape_range.min, shape_range.opt, shape_range.max))
        return {n: (lo[n], opt[n], hi[n]) for n in self.input_names}

    def check_feed(self, feed: dict[str, torch.Tensor], shape_range: ShapeRange) -> None:
        """InputError naming the tensor and the allowed range when a feed falls outside the profile."""
        expected = set(self.input_names)
        if set(feed) != expected:
            raise InputError(
                f"{self.name}: inputs {sorted(feed)} do not match the network's inputs {sorted(expected)}"
            )
        for name, (lo, _, hi) in self.profile(shape_range).items():
            shape = tuple(feed[name].shape)
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
                raise InputError(f"{self.name}: input '{name}' has shape {shape}; the profile allows {lo} .. {hi}")

    def sample_inputs(self, spec: ShapeSpec, device: str | torch.device = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
        """Deterministic inputs of the right shapes and dtypes (export tracing, parity checks)."""
        gen = torch.Generator().manual_seed(seed)
        shapes, feeds = self.shapes(spec), {}
        for t in self.inputs():
            if t.dtype in (torch.int32, torch.int64):
                feeds[t.name] = torch.randint(0, self.dims.vocab_size, shapes[t.name], generator=gen).to(t.dtype)
            else:
                feeds[t.name] = self.sample_float(t.name, shapes[t.name], gen)
        return {k: v.to(device) for k, v in feeds.items()}

    def sample_float(self, name: str, shape: Shape, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    def build_module(self) -> nn.Module:
        return self.module_class(self.components).eval()


def _batch(n: str) -> dict[int, str]:
    return {0: n}


class TextEncoderDescriptor(NetworkDescriptor):
    name = "text_encoder"
    module_class = networks.TextEncoderNet
    fp32_only = True  # CLIP's causal mask (finfo.min) overflows in fp16; it runs once per prompt

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("input_ids", torch.int32, _batch("N"))]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("text_embeddings", torch.float32, _batch("N"))]

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        n, d = spec.batch * spec.cfg, self.dims  # [negative, positive] rows per distinct prompt pair (at most one per photo)
        return {"input_ids": (n, d.text_len), "text_embeddings": (n, d.text_len, d.text_dim)}


class StepTensors:
    """Every tensor a denoising-step network reads or writes — its dtype, dynamic axes and shape for
    a ShapeSpec — in one table; the step descriptors are lists of names from it."""

    def __init__(self, dims: ModelDims):
        self.dims = dims
        latent_axes = {0: "B", 2: "h", 3: "w"}
        specs = [
            TensorSpec("latents", torch.float32, latent_axes),  # (B, 4, h, w)
            TensorSpec("timestep", torch.float32, {}),  # (1,)
            TensorSpec("text_embeddings", torch.float32, _batch("2B")),  # (2B, 77, D): [uncond x B, cond x B]
            TensorSpec("control_scales", torch.float32, {}),  # (N, 2, 13): per ControlNet, rows scale uncond / cond
            TensorSpec("noise_pred", torch.float32, {0: "2B", 2: "h", 3: "w"}),  # (2B, 4, h, w)
            TensorSpec("deep_feature", torch.float32, {0: "2B", 2: "h", 3: "w"}),  # (2B, C1, h, w)
        ]
        specs += [TensorSpec(name, torch.float32, latent_axes)  # (B, C, h, w): an embedded control image
                  for name in self.hint_names]
        specs += [TensorSpec(name, torch.float32, {0: "2B", 2: f"h{i}", 3: f"w{i}"})
                  for i, name in enumerate(self.residual_names)]
        self.specs = {t.name: t for t in specs}

    @property
    def hint_names(self) -> list[str]:
        return per_controlnet("hint", self.dims.num_controlnets)

    @property
    def residual_names(self) -> list[str]:
        return [f"residual_{i}" for i in range(self.dims.num_scales)]

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        d = self.dims
        h, w = d.latent_size(spec)
        b2 = spec.batch * spec.cfg
        shapes: dict[str, Shape] = {
            "latents": (spec.batch, d.latent_channels, h, w),
            "timestep": (1,),
            "text_embeddings": (b2, d.text_len, d.text_dim),
            "control_scales": (d.num_controlnets, spec.cfg, d.num_scales),
            "noise_pred": (b2, d.latent_channels, h, w),
            "deep_feature": (b2, d.deep_channels, h, w),
        }
        for name in self.hint_names:
            shapes[name] = (spec.batch, d.hint_embedding_channels, h, w)
        for name, (channels, factor) in zip(self.residual_names, d.residual_layout, strict=True):
            shapes[name] = (b2, channels, h // factor, w // factor)
        return shapes


class StepDescriptor(NetworkDescriptor):
    """A network of the denoising step: its inputs and outputs are names from StepTensors."""

    input_tensors: tuple[str, ...] = ()  # "*hints": one per ControlNet; "*residuals": residual_0 .. residual_12;
    # "*skips": the residuals a shallow step reads
    output_tensors: tuple[str, ...] = ()

    def __init__(self, components: Components):
        super().__init__(components)
        self.tensors = StepTensors(self.dims)

    def _expand(self, names: tuple[str, ...]) -> list[str]:
        out: list[str] = []
        expansions = {"*residuals": self.tensors.residual_names, "*hints": self.tensors.hint_names,
                      "*skips": self.tensors.residual_names[: self.dims.shallow_skips]}
        for name in names:
            out += expansions.get(name, [name])
        return out

    def inputs(self) -> list[TensorSpec]:
        return [self.tensors.specs[n] for n in self._expand(self.input_tensors)]

    def outputs(self) -> list[TensorSpec]:
        return [self.tensors.specs[n] for n in self._expand(self.output_tensors)]

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        all_shapes = self.tensors.shapes(spec)
        return {n: all_shapes[n] for n in self.input_names + self.output_names}

    def sample_float(self, name: str, shape: Shape, gen: torch.Generator) -> torch.Tensor:
        if name == "timestep":
            return torch.tensor([501.0])
        if name == "control_scales":
            return torch.ones(shape)
        return torch.randn(shape, generator=gen)


class FusedStepDescriptor(StepDescriptor):
    """ControlNet + UNet in one network: what a full step evaluates."""

    name = "fused_step"
    module_class = networks.FusedStepNet
    input_tensors = ("latents", "timestep", "text_embeddings", "*hints", "control_scales")
    output_tensors = ("noise_pred",)


class ControlNetDescriptor(StepDescriptor):
    """The fused step's first half: the ControlNet's scaled residuals, for split engines."""

    name = "controlnet"
    module_class = networks.ControlNetNet
    input_tensors = FusedStepDescriptor.input_tensors
    output_tensors = ("*residuals",)


class UNetDescriptor(StepDescriptor):
    """The fused step's second half: the UNet with the residuals as inputs."""

    name = "unet"
    module_class = networks.UNetNet
    input_tensors = ("latents", "timestep", "text_embeddings", "*residuals")
    output_tensors = ("noise_pred",)


class UNetDeepDescriptor(StepDescriptor):
    """UNetDescriptor's network that also returns the deep feature a DeepCache shallow step reuses."""

    name = "unet_deep"
    module_class = networks.UNetDeepNet
    input_tensors = UNetDescriptor.input_tensors
    output_tensors = ("noise_pred", "deep_feature")


class UNetShallowDescriptor(StepDescriptor):
    """DeepCache's shallow step: the outer UNet blocks on the cached deep feature."""

    name = "unet_shallow"
    module_class = networks.UNetShallowNet
    input_tensors = ("latents", "timestep", "text_embeddings", "*skips", "deep_feature")
    output_tensors = ("noise_pred",)


class ControlHintDescriptor(NetworkDescriptor):
    name = "control_hint"
    module_class = networks.ControlHintNet

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(n, torch.float32, {0: "B", 2: "H", 3: "W"})
                for n in per_controlnet("control", self.dims.num_controlnets)]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec(n, torch.float32, {0: "B", 2: "h", 3: "w"})
                for n in per_controlnet("hint", self.dims.num_controlnets)]

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        d = self.dims
        h, w = d.latent_size(spec)
        shapes = {n: (spec.batch, d.hint_channels, spec.height, spec.width) for n in self.input_names}
        return shapes | {n: (spec.batch, d.hint_embedding_channels, h, w) for n in self.output_names}

    def sample_float(self, name: str, shape: Shape, gen: torch.Generator) -> torch.Tensor:
        return (torch.rand(shape, generator=gen) > 0.9).float()  # an edge map: 0 or 1


class VaeDecoderDescriptor(NetworkDescriptor):
    name = "vae_decoder"
    module_class = networks.VaeDecoderNet

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("latents", torch.float32, {0: "B", 2: "h", 3: "w"})]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("images", torch.float32, {0: "B", 2: "H", 3: "W"})]

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        d = self.dims
        h, w = d.latent_size(spec)
        return {"latents": (spec.batch, d.latent_channels, h, w),
                "images": (spec.batch, d.image_channels, spec.height, spec.width)}


class VaeEncoderDescriptor(NetworkDescriptor):
    name = "vae_encoder"
    module_class = networks.VaeEncoderNet

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("images", torch.float32, {0: "B", 2: "H", 3: "W"})]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("latents", torch.float32, {0: "B", 2: "h", 3: "w"})]

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        d = self.dims
        h, w = d.latent_size(spec)
        return {"images": (spec.batch, d.image_channels, spec.height, spec.width),
                "latents": (spec.batch, d.latent_channels, h, w)}

    def sample_float(self, name: str, shape: Shape, gen: torch.Generator) -> torch.Tensor:
        return torch.rand(shape, generator=gen) * 2 - 1


DESCRIPTORS: dict[str, type[NetworkDescriptor]] = {
    d.name: d for d in (TextEncoderDescriptor, ControlHintDescriptor, ControlNetDescriptor, UNetDescriptor,
                        FusedStepDescriptor, UNetDeepDescriptor, UNetShallowDescriptor, VaeDecoderDescriptor,
                        VaeEncoderDescriptor)
}
assert tuple(DESCRIPTORS) == NETWORKS, f"config.NETWORKS {NETWORKS} must name these descriptors: {tuple(DESCRIPTORS)}"
PIPELINE_NETWORKS = ("text_encoder", "control_hint", "fused_step", "vae_decoder")  # what ControlNetPipeline runs


def get_descriptor(name: str, components: Components) -> NetworkDescriptor:
    """The descriptor of network `name`; unknown names list the valid ones."""
    if name not in DESCRIPTORS:
        raise InputError(f"unknown network {name!r}; valid networks: {', '.join(DESCRIPTORS)}")
    return DESCRIPTORS[name](components)
