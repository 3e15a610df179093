"""The torch modules every backend runs: fixed named inputs/outputs, one per network descriptor."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from sdcn_trt.models.components import Components
from sdcn_trt.errors import InputError


class TextEncoderNet(nn.Module):
    """input_ids (N, 77) int32 -> text_embeddings (N, 77, D): CLIP's last hidden state."""

    def __init__(self, components: Components):
        super().__init__()
        self.text_encoder = components.text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.long(), return_dict=True).last_hidden_state


class ControlHintNet(nn.Module):
    """control (B, 3, H, W) in [0, 1] per ControlNet -> hint (B, C, h, w) per ControlNet: each ControlNet's
    hint-embedding convolutions.

    Its inputs are the same at every step, so the pipeline runs it once per image instead of once per
    step (the contest's "hint block run once per image").
    """

    def __init__(self, components: Components):
        super().__init__()
        self.embeddings = nn.ModuleList(net.controlnet_cond_embedding for net in components.controlnets)

    def forward(self, *controls: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        hints = tuple(embed(c) for embed, c in zip(self.embeddings, controls, strict=True))
        return hints[0] if len(hints) == 1 else hints


def _controlnet_taking_hint(controlnet: nn.Module) -> nn.Module:
    """The same ControlNet (shared parameters) whose `controlnet_cond` is an already embedded hint."""
    clone = copy.copy(controlnet)
    clone._modules = dict(controlnet._modules)  # a module table of its own, the same parameter tensors
    clone.controlnet_cond_embedding = nn.Identity()
    return clone


def controlnet_residuals(controlnets: nn.ModuleList, latents: torch.Tensor, timestep: torch.Tensor,
                         text_embeddings: torch.Tensor, hints: tuple[torch.Tensor, ...],
                         control_scales: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(x, residuals) for the CFG batch [uncond x B, cond x B]: x (2B, 4, h, w) and the 13 residuals,
    the sum over ControlNets of each one's residuals scaled by its rows of `control_scales` (N, 2, 13)
    — a zero row is guess mode's "no control on the unconditional half" — as diffusers'
    MultiControlNetModel adds them (in ControlNet order)."""
    batch = latents.shape[0]
    x = torch.cat([latents, latents], dim=0)  # (2B, 4, h, w)
    total: list[torch.Tensor] = []
    for k, (net, hint) in enumerate(zip(controlnets, hints, strict=True)):
        scales = control_scales[k].to(x.dtype).repeat_interleave(batch, dim=0)  # (2B, 13)
        down, mid = net(
            x, timestep.expand(x.shape[0]), encoder_hidden_states=text_embeddings,
            controlnet_cond=torch.cat([hint, hint], dim=0), conditioning_scale=1.0, return_dict=False,
        )
        scaled = [r * scales[:, i, None, None, None] for i, r in enumerate([*down, mid])]
        total = scaled if k == 0 else [t + r for t, r in zip(total, scaled, strict=True)]
    return x, total


class FusedStepNet(nn.Module):
    """One denoising evaluation: the ControlNets and the UNet on the CFG batch [uncond x B, cond x B].

    Inputs: latents (B, 4, h, w); timestep (1,) float32; text_embeddings (2B, 77, D); one hint
    (B, C, h, w) per ControlNet from ControlHintNet ("hint", "hint_1", ...); control_scales (N, 2, 13):
    per ControlNet, row 0 scales the unconditional half's residuals, row 1 the conditional half's
    (guess mode = a zero row 0). Output: noise_pred (2B, 4, h, w), unconditional half first.
    """

    def __init__(self, components: Components):
        super().__init__()
        self.controlnets = nn.ModuleList(_controlnet_taking_hint(net) for net in components.controlnets)
        self.unet = components.unet

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                *hints_and_scales: torch.Tensor) -> torch.Tensor:
        *hints, control_scales = hints_and_scales
        x, residuals = controlnet_residuals(self.controlnets, latents, timestep, text_embeddings, tuple(hints),
                                            control_scales)
        return self.unet(
            x, timestep.expand(x.shape[0]), encoder_hidden_states=text_embeddings,
            down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


class ControlNetNet(nn.Module):
    """FusedStepNet's first half: the 13 summed, scaled residuals (2B, C_i, h_i, w_i), for split engines."""

    def __init__(self, components: Components):
        super().__init__()
        self.controlnets = nn.ModuleList(_controlnet_taking_hint(net) for net in components.controlnets)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                *hints_and_scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *hints, control_scales = hints_and_scales
        return tuple(controlnet_residuals(self.controlnets, latents, timestep, text_embeddings, tuple(hints),
                                          control_scales)[1])


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


# -- DeepCache (Ma et al. 2023): a full UNet pass that keeps its deep feature, and a shallow pass
#    that runs only the outermost blocks on it. Written out block by block, in diffusers'
#    UNet2DConditionModel.forward order, for SD-style UNets (no class/addition embeddings).
def check_sd_unet(unet: nn.Module) -> None:
    """InputError unless the UNet has SD1.x's plain structure, which the block-by-block passes assume."""
    cfg = unet.config
    extras = {name: getattr(cfg, name, None) for name in ("class_embed_type", "addition_embed_type",
                                                          "encoder_hid_dim_type", "time_embedding_act_fn")}
    extras = {k: v for k, v in extras.items() if v is not None}
    if extras or getattr(cfg, "center_input_sample", False) or len(unet.up_blocks) < 2:
        raise InputError(f"deep-feature caching needs an SD1.x-style UNet with at least two levels; this one has "
                         f"{extras or {'levels': len(unet.up_blocks)}}")


def _time_embedding(unet: nn.Module, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    return unet.time_embedding(unet.get_time_embed(sample=x, timestep=timestep), None)  # (2B, 4C)


def _down(block: nn.Module, h: torch.Tensor, emb: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, encoder_hidden_states=text, attention_mask=None,
                     cross_attention_kwargs=None, encoder_attention_mask=None)
    return block(hidden_states=h, temb=emb)


def _up(block: nn.Module, h: torch.Tensor, emb: torch.Tensor, skips: tuple, text: torch.Tensor,
        upsample_size: Any) -> torch.Tensor:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=text,
                     cross_attention_kwargs=None, upsample_size=upsample_size, attention_mask=None,
                     encoder_attention_mask=None)
    return block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, upsample_size=upsample_size)


def _out(unet: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


class UNetDeepNet(nn.Module):
    """UNetNet that also returns the deep feature: the input of the UNet's last up block, (2B, C1, h, w)."""

    def __init__(self, components: Components):
        super().__init__()
        check_sd_unet(components.unet)
        self.unet = components.unet

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                *residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unet = self.unet
        x = torch.cat([latents, latents], dim=0)  # (2B, 4, h, w)
        emb = _time_embedding(unet, x, timestep)
        h = unet.conv_in(x)
        skips: tuple = (h,)
        for block in unet.down_blocks:
            h, more = _down(block, h, emb, text_embeddings)
            skips += more
        skips = tuple(s + r for s, r in zip(skips, residuals[:-1], strict=True))
        h = unet.mid_block(h, emb, encoder_hidden_states=text_embeddings, attention_mask=None,
                           cross_attention_kwargs=None, encoder_attention_mask=None) + residuals[-1]
        factor = 2 ** unet.num_upsamplers
        forward_size = any(d % factor for d in x.shape[-2:])
        deep = h
        for i, block in enumerate(unet.up_blocks):
            n = len(block.resnets)
            taken, skips = skips[-n:], skips[:-n]
            last = i == len(unet.up_blocks) - 1
            if last:
                deep = h
            h = _up(block, h, emb, taken, text_embeddings, skips[-1].shape[2:] if forward_size and not last else None)
        return _out(unet, h), deep


class UNetShallowNet(nn.Module):
    """DeepCache's shallow step: conv_in, the first down block, and the last up block on the cached deep
    feature, with the first residuals of the last ControlNet evaluation. Inputs: latents, timestep,
    text_embeddings, residual_0 .. residual_{k-1} (k = the last up block's skips), deep_feature."""

    def __init__(self, components: Components):
        super().__init__()
        check_sd_unet(components.unet)
        self.unet = components.unet

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                *residuals_and_deep: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        *residuals, deep = residuals_and_deep
        x = torch.cat([latents, latents], dim=0)  # (2B, 4, h, w)
        emb = _time_embedding(unet, x, timestep)
        h = unet.conv_in(x)
        skips: tuple = (h,)
        _, more = _down(unet.down_blocks[0], h, emb, text_embeddings)
        skips = tuple(s + r for s, r in zip((skips + more)[: len(residuals)], residuals, strict=True))
        return _out(unet, _up(unet.up_blocks[-1], deep, emb, skips, text_embeddings, None))
