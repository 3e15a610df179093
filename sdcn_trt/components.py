"""Components: the four networks and the tokenizer of one SD + ControlNet model, and SD1.x constants."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdcn_trt.errors import WeightsError

SD15_SCALING_FACTOR = 0.18215  # ldm's `scale_factor` for SD1.x latents


@dataclass
class Components:
    """The four networks and the tokenizer of one SD + ControlNet model (torch, fp32, CPU)."""

    tokenizer: Any  # transformers.CLIPTokenizer
    text_encoder: Any  # transformers.CLIPTextModel
    unet: Any  # diffusers.UNet2DConditionModel
    controlnet: Any  # diffusers.ControlNetModel
    vae: Any  # diffusers.AutoencoderKL
    source: str = "unknown"  # where the weights came from, for logs and cache keys
    more_controlnets: tuple[Any, ...] = ()  # further ControlNets whose residuals add to the first's (Multi-ControlNet)

    def __post_init__(self) -> None:
        self.more_controlnets = tuple(self.more_controlnets)
        check_controlnets(self.unet, self.controlnets)

    @property
    def controlnets(self) -> tuple[Any, ...]:
        """Every ControlNet, the first (the canny one, fed the edge map of the photo) first."""
        return (self.controlnet, *self.more_controlnets)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def modules(self) -> dict[str, torch.nn.Module]:
        extra = {f"controlnet_{k}": net for k, net in enumerate(self.more_controlnets, 1)}
        return {"text_encoder": self.text_encoder, "unet": self.unet, "controlnet": self.controlnet, **extra,
                "vae": self.vae}

    def eval_(self) -> "Components":
        for module in self.modules().values():
            module.eval().requires_grad_(False)
        return self


def check_controlnets(unet: Any, controlnets: tuple[Any, ...]) -> None:
    """WeightsError unless every ControlNet's residuals fit the UNet: the same text width (SD1.x 768,
    SD2.x 1024), block widths and control-image channels."""
    for k, net in enumerate(controlnets):
        cfg, ucfg = net.config, unet.config
        what = f"ControlNet {k}" if len(controlnets) > 1 else "the ControlNet"
        if cfg.cross_attention_dim != ucfg.cross_attention_dim:
            raise WeightsError(f"{what} reads {cfg.cross_attention_dim}-wide text (SD2.x: 1024, SD1.x: 768); the UNet "
                               f"reads {ucfg.cross_attention_dim}-wide text: they belong to different base models")
        if tuple(cfg.block_out_channels) != tuple(ucfg.block_out_channels):
            raise WeightsError(f"{what} has block widths {tuple(cfg.block_out_channels)}; the UNet has "
                               f"{tuple(ucfg.block_out_channels)}: its residuals do not fit")
        if cfg.conditioning_channels != controlnets[0].config.conditioning_channels:
            raise WeightsError(f"{what} takes {cfg.conditioning_channels}-channel control images; ControlNet 0 takes "
                               f"{controlnets[0].config.conditioning_channels}")
