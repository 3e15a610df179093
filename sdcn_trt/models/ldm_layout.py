"""diffusers -> original ldm layout: write a model as one control_sd15_canny-style file + YAML.

This is the inverse of the converters `single_file.py` uses; tests prove the round trip is exact,
and the reference-parity script feeds these files to the original ControlNet code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdcn_trt.cache import atomic_path
from sdcn_trt.models.single_file import CLIP_PREFIX, CONTROL_PREFIX, UNET_PREFIX, VAE_PREFIX
from sdcn_trt.models.components import Components

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(state: dict[str, torch.Tensor], table: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Map every key through the first (diffusers prefix -> ldm prefix) pair that matches it."""
    out = {}
    for key, value in state.items():
        for new, old in table:
            if key == new or key.startswith(new + "."):
                out[old + key[len(new):]] = value
                break
        else:
            raise KeyError(f"no ldm name for diffusers key {key!r}")
    return out


def _resnet_pairs(new: str, old: str) -> list[tuple[str, str]]:
    return [(f"{new}.{n}", f"{old}.{o}") for n, o in _RESNET.items()]


def _down_and_mid_table(config: Any) -> list[tuple[str, str]]:
    """UNet/ControlNet encoder half: conv_in, down blocks, mid block, time embedding."""
    r = config.layers_per_block
    table = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("conv_in", "input_blocks.0.0")]
    for level in range(len(config.block_out_channels)):
        for j in range(r):
            idx = 1 + level * (r + 1) + j
            table += _resnet_pairs(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{idx}.0")
            table.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{idx}.1"))
        table.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{1 + level * (r + 1) + r}.0.op"))
    table += _resnet_pairs("mid_block.resnets.0", "middle_block.0")
    table.append(("mid_block.attentions.0", "middle_block.1"))
    table += _resnet_pairs("mid_block.resnets.1", "middle_block.2")
    return table


def _unet_table(config: Any) -> list[tuple[str, str]]:
    r1 = config.layers_per_block + 1
    table = _down_and_mid_table(config) + [("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    for level, block_type in enumerate(config.up_block_types):
        for j in range(r1):
            idx = level * r1 + j
            table += _resnet_pairs(f"up_blocks.{level}.resnets.{j}", f"output_blocks.{idx}.0")
            table.append((f"up_blocks.{level}.attentions.{j}", f"output_blocks.{idx}.1"))
        upsample_slot = 2 if block_type.startswith("CrossAttn") else 1
        table.append((f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{level * r1 + r1 - 1}.{upsample_slot}.conv"))
    return table


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    return _rename(unet.state_dict(), _unet_table(unet.config))


def unet_ldm_names(unet: Any) -> dict[str, str]:
    """diffusers parameter name -> ldm name (`down_blocks.0.attentions.0.proj_in.weight` ->
    `input_blocks.1.1.proj_in.weight`), for files that name UNet parts the ldm way (kohya LoRAs)."""
    names = _rename({k: k for k in unet.state_dict()}, _unet_table(unet.config))  # ldm name -> diffusers name
    return {diffusers: ldm for ldm, diffusers in names.items()}


def controlnet_to_ldm(controlnet: Any) -> dict[str, torch.Tensor]:
    table = _down_and_mid_table(controlnet.config)
    emb = controlnet.controlnet_cond_embedding
    table.append(("controlnet_cond_embedding.conv_in", "input_hint_block.0"))
    table += [(f"controlnet_cond_embedding.blocks.{i}", f"input_hint_block.{2 * i + 2}") for i in range(len(emb.blocks))]
    table.append(("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * len(emb.blocks) + 2}"))
    table += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0") for i in range(len(controlnet.controlnet_down_blocks))]
    table.append(("controlnet_mid_block", "middle_block_out.0"))
    return _rename(controlnet.state_dict(), table)


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    table: list[tuple[str, str]] = []
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_norm_out", f"{part}.norm_out"), (f"{part}.conv_in", f"{part}.conv_in"),
                  (f"{part}.conv_out", f"{part}.conv_out")]
        table += [(f"{part}.mid_block.attentions.0.{n}", f"{part}.mid.attn_1.{o}") for n, o in _VAE_ATTN.items()]
        table += [(f"{part}.mid_block.resnets.{i}.conv_shortcut", f"{part}.mid.block_{i + 1}.nin_shortcut") for i in (0, 1)]
        table += [(f"{part}.mid_block.resnets.{i}", f"{part}.mid.block_{i + 1}") for i in (0, 1)]
    for i in range(levels):
        table += [(f"encoder.down_blocks.{i}.resnets.{j}.conv_shortcut", f"encoder.down.{i}.block.{j}.nin_shortcut")
                  for j in range(vae.config.layers_per_block)]
        table += [(f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block"),
                  (f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")]
        up = levels - 1 - i
        table += [(f"decoder.up_blocks.{i}.resnets.{j}.conv_shortcut", f"decoder.up.{up}.block.{j}.nin_shortcut")
                  for j in range(vae.config.layers_per_block + 1)]
        table += [(f"decoder.up_blocks.{i}.resnets", f"decoder.up.{up}.block"),
                  (f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv")]
    table += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    out = _rename(vae.state_dict(), table)
    for key, value in out.items():  # ldm's VAE attention uses 1x1 convolutions
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def _clip_to_ldm(text_encoder: Any) -> dict[str, torch.Tensor]:
    """The original's FrozenCLIPEmbedder holds a CLIPTextModel: keys 'text_model.*'."""
    state = {k: v for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}


def to_ldm_state_dict(components: Components, copy: bool = True) -> dict[str, torch.Tensor]:
    """One state dict in control_sd15_canny.pth's layout (UNet, ControlNet, VAE, CLIP text model);
    `copy=False` shares the networks' tensors (writing a file needs no second copy of the model)."""
    state: dict[str, torch.Tensor] = {}
    for prefix, part in ((UNET_PREFIX, unet_to_ldm(components.unet)),
                         (CONTROL_PREFIX, controlnet_to_ldm(components.controlnet)),
                         (VAE_PREFIX, vae_to_ldm(components.vae)),
                         (CLIP_PREFIX, _clip_to_ldm(components.text_encoder))):
        state.update({prefix + k: (v.detach().clone() if copy else v.detach()).contiguous() for k, v in part.items()})
    return state


def _ldm_unet_params(config: Any, *, control: bool) -> dict[str, Any]:
    mults = [c // config.block_out_channels[0] for c in config.block_out_channels]
    attn = [2**i for i, t in enumerate(config.down_block_types) if t.startswith("CrossAttn")]
    heads = config.attention_head_dim
    params = dict(image_size=32, in_channels=config.in_channels, model_channels=config.block_out_channels[0],
                  attention_resolutions=attn, num_res_blocks=config.layers_per_block, channel_mult=mults,
                  num_heads=heads if isinstance(heads, int) else heads[0], use_spatial_transformer=True,
                  transformer_depth=1, context_dim=config.cross_attention_dim, use_checkpoint=False, legacy=False)
    if control:
        params["hint_channels"] = config.conditioning_channels
    else:
        params["out_channels"] = config.out_channels
    return params


def original_config_for(components: Components, clip_version: str = "openai/clip-vit-large-patch14") -> dict[str, Any]:
    """A cldm_v15.yaml-shaped config describing `components` (the original code can build it)."""
    vae = components.vae.config
    return {"model": {"target": "cldm.cldm.ControlLDM", "params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "control_key": "hint",
        "image_size": 64, "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema", "scale_factor": float(vae.scaling_factor), "use_ema": False,
        "only_mid_control": False,
        "control_stage_config": {"target": "cldm.cldm.ControlNet",
                                 "params": _ldm_unet_params(components.controlnet.config, control=True)},
        "unet_config": {"target": "cldm.cldm.ControlledUnetModel",
                        "params": _ldm_unet_params(components.unet.config, control=False)},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": vae.latent_channels, "monitor": "val/rec_loss",
            "ddconfig": {"double_z": True, "z_channels": vae.latent_channels, "resolution": 256,
                         "in_channels": vae.in_channels, "out_ch": vae.out_channels, "ch": vae.block_out_channels[0],
                         "ch_mult": [c // vae.block_out_channels[0] for c in vae.block_out_channels],
                         "num_res_blocks": vae.layers_per_block, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                              "params": {"version": clip_version}},
    }}}


def save_single_file(components: Components, checkpoint: str | Path, yaml_path: str | Path | None = None) -> Path:
    """Write the ldm-layout checkpoint (.safetensors or .pth/.ckpt) and, if asked, its YAML."""
    import yaml

    checkpoint = Path(checkpoint)
    state = to_ldm_state_dict(components, copy=False)
    with atomic_path(checkpoint) as tmp:
        if checkpoint.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp))
        else:
            torch.save(state, str(tmp))
    if yaml_path is not None:
        Path(yaml_path).write_text(yaml.safe_dump(original_config_for(components), sort_keys=False))
    return checkpoint
