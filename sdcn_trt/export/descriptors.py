"""One descriptor per network: names, dtypes, shapes, dynamic axes, profiles and sample inputs.

Everything is derived from the model's own configs and one ShapeSpec; export, engine builds,
buffer allocation, feeds and shape checks all read these and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from sdcn_trt import networks
from sdcn_trt.errors import InputError
from sdcn_trt.models import Components

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeSpec:
    """One workload shape: images per call, image size in pixels, CFG multiplier."""

    batch: int = 1
    height: int = 256
    width: int = 384
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
    def dynamic(cls, opt: ShapeSpec, max_batch: int = 4, min_side: int = 256, max_side: int = 768) -> "ShapeRange":
        return cls(ShapeSpec(1, min_side, min_side, opt.cfg), opt, ShapeSpec(max_batch, max_side, max_side, opt.cfg))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    dynamic_axes: dict[int, str]  # axis -> symbolic name, for export


class NetworkDescriptor:
    """Base class: subclasses list their tensors and map a ShapeSpec to each tensor's shape."""

    name: str = ""
    module_class: Callable[[Components], nn.Module]

    def __init__(self, components: Components):
        self.components = components
        unet, text = components.unet.config, components.text_encoder.config
        self.latent_channels = int(unet.in_channels)
        self.vae_scale = components.vae_scale_factor
        self.text_len = int(text.max_position_embeddings)
        self.text_dim = int(text.hidden_size)
        self.num_scales = len(components.controlnet.controlnet_down_blocks) + 1
        self.hint_channels = int(components.controlnet.config.conditioning_channels)  # the control image's
        self.hint_embedding_channels = int(components.controlnet.config.block_out_channels[0])
        self.image_channels = int(components.vae.config.out_channels)

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

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes for t in self.inputs() + self.outputs() if t.dynamic_axes}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {t.name: t.dtype for t in self.inputs() + self.outputs()}

    def latent_size(self, spec: ShapeSpec) -> tuple[int, int]:
        if spec.height % self.vae_scale or spec.width % self.vae_scale:
            raise InputError(f"{spec.height}x{spec.width} is not a multiple of the VAE's {self.vae_scale}")
        return spec.height // self.vae_scale, spec.width // self.vae_scale

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
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                raise InputError(f"{self.name}: input '{name}' has shape {shape}; the profile allows {lo} .. {hi}")

    def sample_inputs(self, spec: ShapeSpec, device: str | torch.device = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
        """Deterministic inputs of the right shapes and dtypes (export tracing, parity checks)."""
        gen = torch.Generator().manual_seed(seed)
        shapes, feeds = self.shapes(spec), {}
        for t in self.inputs():
            if t.dtype in (torch.int32, torch.int64):
                feeds[t.name] = torch.randint(0, 49406, shapes[t.name], generator=gen).to(t.dtype)
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

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("input_ids", torch.int32, _batch("N"))]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("text_embeddings", torch.float32, _batch("N"))]

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        n = spec.cfg  # one row per distinct prompt (cached, then repeated per sample)
        return {"input_ids": (n, self.text_len), "text_embeddings": (n, self.text_len, self.text_dim)}


class FusedStepDescriptor(NetworkDescriptor):
    name = "fused_step"
    module_class = networks.FusedStepNet

    def inputs(self) -> list[TensorSpec]:
        latent_axes = {0: "B", 2: "h", 3: "w"}
        return [
            TensorSpec("latents", torch.float32, latent_axes),
            TensorSpec("timestep", torch.float32, {}),
            TensorSpec("text_embeddings", torch.float32, _batch("2B")),
            TensorSpec("hint", torch.float32, latent_axes),
            TensorSpec("control_scales", torch.float32, {}),
        ]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("noise_pred", torch.float32, {0: "2B", 2: "h", 3: "w"})]

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        h, w = self.latent_size(spec)
        b2 = spec.batch * spec.cfg
        return {
            "latents": (spec.batch, self.latent_channels, h, w),
            "timestep": (1,),
            "text_embeddings": (b2, self.text_len, self.text_dim),
            "hint": (spec.batch, self.hint_embedding_channels, h, w),
            "control_scales": (spec.cfg, self.num_scales),
            "noise_pred": (b2, self.latent_channels, h, w),
        }

    def sample_float(self, name: str, shape: Shape, gen: torch.Generator) -> torch.Tensor:
        if name == "timestep":
            return torch.tensor([501.0])
        if name == "control_scales":
            return torch.ones(shape)
        return torch.randn(shape, generator=gen)


class ControlHintDescriptor(NetworkDescriptor):
    name = "control_hint"
    module_class = networks.ControlHintNet

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("control", torch.float32, {0: "B", 2: "H", 3: "W"})]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("hint", torch.float32, {0: "B", 2: "h", 3: "w"})]

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        h, w = self.latent_size(spec)
        return {"control": (spec.batch, self.hint_channels, spec.height, spec.width),
                "hint": (spec.batch, self.hint_embedding_channels, h, w)}

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
        h, w = self.latent_size(spec)
        return {"latents": (spec.batch, self.latent_channels, h, w),
                "images": (spec.batch, self.image_channels, spec.height, spec.width)}


class VaeEncoderDescriptor(NetworkDescriptor):
    name = "vae_encoder"
    module_class = networks.VaeEncoderNet

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("images", torch.float32, {0: "B", 2: "H", 3: "W"})]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("latents", torch.float32, {0: "B", 2: "h", 3: "w"})]

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        h, w = self.latent_size(spec)
        return {"images": (spec.batch, self.image_channels, spec.height, spec.width),
                "latents": (spec.batch, self.latent_channels, h, w)}

    def sample_float(self, name: str, shape: Shape, gen: torch.Generator) -> torch.Tensor:
        return torch.rand(shape, generator=gen) * 2 - 1


class ControlNetDescriptor(FusedStepDescriptor):
    name = "controlnet"
    module_class = networks.ControlNetNet

    def residual_layout(self) -> list[tuple[int, int]]:
        """(channels, spatial downsampling factor) of each residual, from the ControlNet's config."""
        cfg = self.components.controlnet.config
        levels, per_level = len(cfg.block_out_channels), cfg.layers_per_block
        factors = [1]
        for level in range(levels):
            factors += [2**level] * per_level
            if level < levels - 1:
                factors.append(2 ** (level + 1))
        factors.append(2 ** (levels - 1))  # mid block
        convs = list(self.components.controlnet.controlnet_down_blocks) + [self.components.controlnet.controlnet_mid_block]
        return [(int(c.out_channels), f) for c, f in zip(convs, factors)]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec(f"residual_{i}", torch.float32, {0: "2B", 2: f"h{i}", 3: f"w{i}"})
                for i in range(self.num_scales)]

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        shapes = super().shapes(spec)
        del shapes["noise_pred"]
        h, w = self.latent_size(spec)
        b2 = spec.batch * spec.cfg
        for i, (channels, factor) in enumerate(self.residual_layout()):
            shapes[f"residual_{i}"] = (b2, channels, h // factor, w // factor)
        return shapes


class UNetDescriptor(ControlNetDescriptor):
    name = "unet"
    module_class = networks.UNetNet

    def inputs(self) -> list[TensorSpec]:
        fused = {t.name: t for t in FusedStepDescriptor.inputs(self)}
        return [fused["latents"], fused["timestep"], fused["text_embeddings"]] + ControlNetDescriptor.outputs(self)

    def outputs(self) -> list[TensorSpec]:
        return FusedStepDescriptor.outputs(self)

    def shapes(self, spec: ShapeSpec) -> dict[str, Shape]:
        shapes = ControlNetDescriptor.shapes(self, spec)
        del shapes["hint"], shapes["control_scales"]
        shapes["noise_pred"] = FusedStepDescriptor.shapes(self, spec)["noise_pred"]
        return shapes


DESCRIPTORS: dict[str, type[NetworkDescriptor]] = {
    d.name: d for d in (TextEncoderDescriptor, ControlHintDescriptor, ControlNetDescriptor, UNetDescriptor,
                        FusedStepDescriptor, VaeDecoderDescriptor, VaeEncoderDescriptor)
}
PIPELINE_NETWORKS = ("text_encoder", "control_hint", "fused_step", "vae_decoder")  # what ControlNetPipeline runs


def get_descriptor(name: str, components: Components) -> NetworkDescriptor:
    """The descriptor of network `name`; unknown names list the valid ones."""
    if name not in DESCRIPTORS:
        raise InputError(f"unknown network {name!r}; valid networks: {', '.join(DESCRIPTORS)}")
    return DESCRIPTORS[name](components)
