"""The torch modules every backend runs: fixed named inputs/outputs, one per network descriptor."""
from __future__ import annotations

import copy

import torch
from torch import nn

from sdcn_trt.components import Components


class TextEncoderNet(nn.Module):
    """input_ids (N, 77) int32 -> text_embeddings (N, 77, D): CLIP's last hidden state."""

    def __init__(self, components: Components):
        super().__init__()
        self.text_encoder = components.text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.long(), return_dict=True).last_hidden_state


class ControlHintNet(nn.Module):
    """control (B, 3, H, W) in [0, 1] -> hint (B, C, h, w): ControlNet's hint-embedding convolutions.

    Its input is the same at every step, so the pipeline runs it once per image instead of once per
    step (the contest's "hint block run once per image").
    """

    def __init__(self, components: Components):
        super().__init__()
        self.embedding = components.controlnet.controlnet_cond_embedding

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        return self.embedding(control)


def _controlnet_taking_hint(controlnet: nn.Module) -> nn.Module:
    """The same ControlNet (shared parameters) whose `controlnet_cond` is an already embedded hint."""
    clone = copy.copy(controlnet)
    clone._modules = dict(controlnet._modules)  # a module table of its own, the same parameter tensors
    clone.controlnet_cond_embedding = nn.Identity()
    return clone


def controlnet_residuals(controlnet: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                         text_embeddings: torch.Tensor, hint: torch.Tensor,
                         control_scales: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(x, residuals) for the CFG batch [uncond x B, cond x B]: x (2B, 4, h, w) and the ControlNet's
    13 residuals, each scaled by its row of `control_scales` (2, 13) — a zero row is guess mode's
    "no control on the unconditional half"."""
    batch = latents.shape[0]
    x = torch.cat([latents, latents], dim=0)  # (2B, 4, h, w)
    scales = control_scales.to(x.dtype).repeat_interleave(batch, dim=0)  # (2B, 13)
    down, mid = controlnet(
        x, timestep.expand(x.shape[0]), encoder_hidden_states=text_embeddings,
        controlnet_cond=torch.cat([hint, hint], dim=0), conditioning_scale=1.0, return_dict=False,
    )
    return x, [r * scales[:, i, None, None, None] for i, r in enumerate([*down, mid])]


class FusedStepNet(nn.Module):
    """One denoising evaluation: ControlNet and UNet on the CFG batch [uncond x B, cond x B].

    Inputs: latents (B, 4, h, w); timestep (1,) float32; text_embeddings (2B, 77, D);
    hint (B, C, h, w) from ControlHintNet; control_scales (2, 13): row 0 scales the unconditional
    half's residuals, row 1 the conditional half's (guess mode = a zero row 0). Output:
    noise_pred (2B, 4, h, w), unconditional half first.
    """

    def __init__(self, components: Components):
        super().__init__()
        self.controlnet = _controlnet_taking_hint(components.controlnet)
        self.unet = components.unet

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                hint: torch.Tensor, control_scales: torch.Tensor) -> torch.Tensor:
        x, residuals = controlnet_residuals(self.controlnet, latents, timestep, text_embeddings, hint, control_scales)
        return self.unet(
            x, timestep.expand(x.shape[0]), encoder_hidden_states=text_embeddings,
            down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


class ControlNetNet(nn.Module):
    """FusedStepNet's first half: the 13 scaled residuals (2B, C_i, h_i, w_i), for split engines."""

    def __init__(self, components: Components):
        super().__init__()
        self.controlnet = _controlnet_taking_hint(components.controlnet)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                hint: torch.Tensor, control_scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(controlnet_residuals(self.controlnet, latents, timestep, text_embeddings, hint, control_scales)[1])


class UNetNet(nn.Module):
    """FusedStepNet's second half: the UNet with the 13 residuals as inputs."""

    def __init__(self, components: Components):
        super().__init__()
        self.unet = components.unet

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                *residuals: torch.Tensor) -> torch.Tensor:
        x = torch.cat([latents, latents], dim=0)  # (2B, 4, h, w)
        return self.unet(
            x, timestep.expand(x.shape[0]), encoder_hidden_states=text_embeddings,
            down_block_additional_residuals=list(residuals[:-1]), mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


class VaeDecoderNet(nn.Module):
    """latents (B, 4, h, w) -> images (B, 3, H, W) float in [0, 255], the reference's
    `decode(latents / 0.18215) * 127.5 + 127.5`, clipped; the host truncates to uint8."""

    def __init__(self, components: Components):
        super().__init__()
        self.vae = components.vae
        self.inv_scaling = 1.0 / components.scaling_factor  # the reference multiplies by 1 / scale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(self.inv_scaling * latents, return_dict=False)[0]
        return (x * 127.5 + 127.5).clamp(0.0, 255.0)


class VaeEncoderNet(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> latents (B, 4, h, w): scaled posterior mean (img2img use)."""

    def __init__(self, components: Components):
        super().__init__()
        self.vae = components.vae
        self.scaling = components.scaling_factor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images, return_dict=False)[0].mean * self.scaling
