"""Random low-rank LoRA files for tests, written in the kohya and diffusers/PEFT layouts."""
from __future__ import annotations

from pathlib import Path

import torch

# Modules of the tiny preset a LoRA targets: attention and feed-forward Linears, the 1x1 proj_in
# convolution, a 3x3 resnet convolution (LoCon), the time-embedding projection; CLIP's Linears.
UNET_MODULES = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.proj_in",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "up_blocks.1.attentions.0.proj_out",
    "down_blocks.1.resnets.0.conv1",
    "up_blocks.0.resnets.1.time_emb_proj",
)
TEXT_MODULES = (
    "encoder.layers.0.self_attn.q_proj",
    "encoder.layers.1.self_attn.out_proj",
    "encoder.layers.1.mlp.fc1",
)


def random_factors(model: torch.nn.Module, names: tuple[str, ...], rank: int, seed: int,
                   conv_1x1_as_2d: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (down (r, in[, kh, kw]), up (out, r[, 1, 1])), seeded."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        weight = model.get_submodule(name).weight
        o, i = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        if conv_1x1_as_2d and kernel == (1, 1):
            kernel = ()
        down = torch.randn((rank, i, *kernel), generator=gen) * 0.1
        up = torch.randn((o, rank, *((1, 1) if kernel else ())), generator=gen) * 0.1
        out[name] = (down, up)
    return out


def kohya_state(unet: dict, text: dict, alpha: float | None, unet_names: dict[str, str] | None = None) -> dict:
    """kohya keys: lora_unet_<module_with_underscores>.lora_down.weight / .lora_up.weight / .alpha;
    `unet_names` renames UNet modules first (ldm names)."""
    state = {}
    for prefix, factors in (("lora_unet_", unet), ("lora_te_", text)):
        for name, (down, up) in factors.items():
            if prefix == "lora_unet_" and unet_names is not None:
                name = unet_names[name]
            if prefix == "lora_te_":
                name = "text_model." + name  # the files' spelling (CLIPTextModel.text_model before transformers 5)
            base = prefix + name.replace(".", "_")
            state[base + ".lora_down.weight"] = down
            state[base + ".lora_up.weight"] = up
            if alpha is not None:
                state[base + ".alpha"] = torch.tensor(alpha)
    return state


def peft_state(unet: dict, text: dict) -> dict:
    """diffusers/PEFT keys: unet.<module>.lora_A.weight / lora_B.weight, text_encoder.<module>...."""
    state = {}
    for prefix, factors in (("unet.", unet), ("text_encoder.text_model.", text)):
        for name, (down, up) in factors.items():
            state[f"{prefix}{name}.lora_A.weight"] = down
            state[f"{prefix}{name}.lora_B.weight"] = up
    return state


def write(state: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
