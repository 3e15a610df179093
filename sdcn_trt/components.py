"""Components: the four networks and the tokenizer of one SD + ControlNet model, and SD1.x constants."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "unet": self.unet, "controlnet": self.controlnet, "vae": self.vae}

    def eval_(self) -> "Components":
        for module in self.modules().values():
            module.eval().requires_grad_(False)
        return self
