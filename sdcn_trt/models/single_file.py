"""Single-file checkpoints in the original ldm layout (control_sd15_canny.pth and kin), both ways.

Files are memory-mapped, converted key by key (the converters rename; tensors are not copied),
checked against networks built on the meta device, and assigned. The converted weights go to the
weights cache (sdcn_trt.models.weights_cache) under the file's content hash, so a later load of the same
file maps them from there and converts nothing.
"""
from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from sdcn_trt.cache import hash_file_cached, remembered_hash
from sdcn_trt.models.components import SD15_SCALING_FACTOR, Components
from sdcn_trt.config import PRECISIONS, check_choice
from sdcn_trt.errors import WeightsError
from sdcn_trt.models.tokenizer import load_tokenizer, special_token_ids
from sdcn_trt.models.weights import assign_weights, check_weights, empty_init, missing_checkpoint, read_tensors
from sdcn_trt.models.weights_cache import (
    build_empty, cache_dir_for, find_entry, lazy_components, network_dtype, plain, weights_key, write_entry,
)

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
CONTROL_PREFIX = "control_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
IMAGE_SIZE = 512  # only fills diffusers' `sample_size`; SD1.x's training resolution
WHAT = {"text_encoder": "text encoder", "unet": "UNet", "controlnet": "ControlNet", "vae": "VAE"}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or zip-format .pth/.ckpt file, memory-mapped (read when used);
    pickles load with weights_only=True only; any other file is refused, saying what it looks like."""
    path = Path(path)
    state = read_tensors(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def load_original_config(path: str | Path) -> dict[str, Any]:
    """The ldm YAML (cldm_v15.yaml-style) as a dict."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"original config not found: {path}")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "params" not in config["model"]:
        raise WeightsError(f"{path} is not an ldm model config (no model.params)")
    return config


# ---------------------------------------------------------------------------------------------
# Architecture inference from tensor shapes
# ---------------------------------------------------------------------------------------------
def _indices(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return sorted(found)


def infer_unet_params(state: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """ldm `unet_config.params` read off the shapes under `prefix` (UNet or ControlNet).

    Head counts leave no trace in shapes: SD1.x's 8 heads are assumed, SD2.x's 64-wide heads
    when the context is 1024 wide; give original_config for anything else.
    """
    w = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "input_blocks.0.0.weight" not in w:
        raise WeightsError(f"checkpoint has no '{prefix}input_blocks.0.0.weight': not an ldm UNet/ControlNet")
    model_channels, in_channels = w["input_blocks.0.0.weight"].shape[:2]
    blocks = _indices(w, r"input_blocks\.(\d+)\.")
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in w]
    num_res_blocks = (downs[0] - 1) if downs else len(blocks) - 1
    levels = len(downs) + 1
    channel_mult, attention_resolutions = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        channel_mult.append(int(w[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // model_channels))
        if f"input_blocks.{first}.1.proj_in.weight" in w:
            attention_resolutions.append(2**level)
    attn_keys = [k for k in w if k.endswith("attn2.to_k.weight")]
    context_dim = int(w[attn_keys[0]].shape[1]) if attn_keys else None
    first_attn = next((k for k in w if k.endswith(".proj_in.weight")), None)
    linear = first_attn is not None and w[first_attn].ndim == 2
    depth = len(_indices(w, r"input_blocks\.1\.1\.transformer_blocks\.(\d+)\.")) or 1
    params: dict[str, Any] = dict(
        in_channels=int(in_channels), model_channels=int(model_channels), num_res_blocks=num_res_blocks,
        attention_resolutions=attention_resolutions, channel_mult=channel_mult, transformer_depth=depth,
        context_dim=context_dim, use_spatial_transformer=True, use_linear_in_transformer=linear, legacy=False,
    )
    if context_dim == 1024:
        params["num_head_channels"] = 64
    else:
        params["num_heads"] = 8
    if "out.2.weight" in w:
        params["out_channels"] = int(w["out.2.weight"].shape[0])
    if "input_hint_block.0.weight" in w:
        params["hint_channels"] = int(w["input_hint_block.0.weight"].shape[1])
    return params


def infer_vae_ddconfig(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    w = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    if "encoder.conv_in.weight" not in w:
        raise WeightsError(f"checkpoint has no '{VAE_PREFIX}encoder.conv_in.weight': no ldm VAE in it")
    ch = int(w["encoder.conv_in.weight"].shape[0])
    levels = _indices(w, r"encoder\.down\.(\d+)\.")
    return dict(
        double_z=True, z_channels=int(w["decoder.conv_in.weight"].shape[1]), resolution=256,
        in_channels=int(w["encoder.conv_in.weight"].shape[1]), out_ch=int(w["decoder.conv_out.weight"].shape[0]),
        ch=ch, ch_mult=[int(w[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch) for i in levels],
        num_res_blocks=len(_indices(w, r"encoder\.down\.0\.block\.(\d+)\.")), attn_resolutions=[], dropout=0.0,
    )


def infer_original_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A cldm_v15.yaml-shaped config dict read off a combined SD + ControlNet state dict."""
    unet = infer_unet_params(state, UNET_PREFIX)
    control = infer_unet_params(state, CONTROL_PREFIX) if any(k.startswith(CONTROL_PREFIX) for k in state) else None
    return {
        "model": {
            "target": "cldm.cldm.ControlLDM",
            "params": {
                "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000,
                "scale_factor": SD15_SCALING_FACTOR,
                "unet_config": {"target": "cldm.cldm.ControlledUnetModel", "params": unet},
                "control_stage_config": control and {"target": "cldm.cldm.ControlNet", "params": control},
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {"embed_dim": int(state[VAE_PREFIX + "post_quant_conv.weight"].shape[0])
                               if VAE_PREFIX + "post_quant_conv.weight" in state else 4,
                               "ddconfig": infer_vae_ddconfig(state),
                               "lossconfig": {"target": "torch.nn.Identity"}},
                },
                "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
            },
        }
    }


def infer_clip_config(state: dict[str, torch.Tensor], tokenizer: Any) -> dict[str, Any]:
    """CLIPTextConfig fields from shapes (heads are hidden / 64 as in every OpenAI CLIP text tower) and
    the special token ids from the tokenizer."""
    p = CLIP_PREFIX + "text_model."
    if p + "embeddings.token_embedding.weight" not in state:
        raise WeightsError(f"checkpoint has no '{p}embeddings.token_embedding.weight': give text_encoder_config")
    vocab, hidden = state[p + "embeddings.token_embedding.weight"].shape
    return dict(
        vocab_size=int(vocab), hidden_size=int(hidden), num_attention_heads=max(1, int(hidden) // 64),
        intermediate_size=int(state[p + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=len(_indices(state, re.escape(p) + r"encoder\.layers\.(\d+)\.")),
        max_position_embeddings=int(state[p + "embeddings.position_embedding.weight"].shape[0]),
        hidden_act="quick_gelu", projection_dim=int(hidden), **special_token_ids(tokenizer),
    )


# ---------------------------------------------------------------------------------------------
# ldm -> diffusers
# ---------------------------------------------------------------------------------------------
def _controlnet_config(original_config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """diffusers 0.42.1's create_controlnet_diffusers_config_from_ldm forgets to pass `checkpoint`
    (TypeError); build the UNet config from the control_stage params instead, then keep the
    fields a ControlNetModel takes."""
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
    )

    params = copy.deepcopy(original_config["model"]["params"]["control_stage_config"]["params"])
    params.setdefault("out_channels", params["in_channels"])
    config = copy.deepcopy(original_config)
    config["model"]["params"]["unet_config"] = {"params": params}
    unet = create_unet_diffusers_config_from_ldm(config, state, image_size=IMAGE_SIZE)
    keep = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
            "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")
    return {"conditioning_channels": params.get("hint_channels", 3), **{k: unet[k] for k in keep}}


def clip_keys_for(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints name CLIP weights 'text_model.*'; transformers >= 5 drops that level. Match the model."""
    wants_prefix = any(k.startswith("text_model.") for k in model.state_dict())
    if wants_prefix:
        return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def convert_state_dict(
    state: dict[str, torch.Tensor], original_config: dict[str, Any], tokenizer: Any,
    text_encoder_config: dict[str, Any] | None, source: Path,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, torch.Tensor]], dict[str, torch.nn.Module]]:
    """(configs, state dicts, empty networks) of every part of a combined ldm checkpoint, converted
    with diffusers' converters (renames: the tensors are the checkpoint's own) and checked strictly
    against networks built empty from the configs."""
    from diffusers.loaders import single_file_utils as sfu

    if original_config["model"]["params"].get("control_stage_config") is None or not any(
        k.startswith(CONTROL_PREFIX) for k in state
    ):
        raise WeightsError(f"{source} has no ControlNet ('{CONTROL_PREFIX}*' keys / control_stage_config)")
    unet_config = plain(sfu.create_unet_diffusers_config_from_ldm(original_config, state, image_size=IMAGE_SIZE))
    control_config = plain(_controlnet_config(original_config, state))
    vae_config = plain(sfu.create_vae_diffusers_config_from_ldm(original_config, state, image_size=IMAGE_SIZE))
    configs = {"unet": unet_config, "controlnet": control_config, "vae": vae_config,
               "text_encoder": plain(text_encoder_config or infer_clip_config(state, tokenizer))}
    networks = build_empty(configs)
    states = {
        "unet": sfu.convert_ldm_unet_checkpoint(state, unet_config),
        "controlnet": sfu.convert_controlnet_checkpoint(state, control_config),
        "vae": sfu.convert_ldm_vae_checkpoint(state, vae_config),
        "text_encoder": clip_keys_for(networks["text_encoder"], sfu.convert_ldm_clip_checkpoint(state)),
    }
    for name in list(states):
        states[name] = {k: v for k, v in states[name].items() if not k.endswith("position_ids")}
        check_weights(networks[name], states[name], WHAT[name], source)
    return configs, states, networks


def _assembled(tokenizer: Any, networks: dict[str, torch.nn.Module], states: dict[str, dict[str, torch.Tensor]],
               precision: str, source: str, weights_key: Any) -> Components:
    """Components holding the converted tensors themselves, cast only where `precision` asks."""
    for name, module in networks.items():
        assign_weights(module, states[name], network_dtype(name, precision))
    return Components(tokenizer, networks["text_encoder"], networks["unet"], networks["controlnet"], networks["vae"],
                      source=source, weights_key=weights_key, precision=precision)


def components_from_state_dict(
    state: dict[str, torch.Tensor], original_config: dict[str, Any], tokenizer: Any,
    text_encoder_config: dict[str, Any] | None, source: Path, precision: str = "fp32",
) -> Components:
    """Convert every part of a combined ldm checkpoint with diffusers' converters, strictly."""
    _, states, networks = convert_state_dict(state, original_config, tokenizer, text_encoder_config, source)
    return _assembled(tokenizer, networks, states, precision, f"single-file:{source}", None)


def load_single_file(
    checkpoint: str | Path, original_config: str | Path | None = None, tokenizer: str | Path | None = None,
    text_encoder_config: str | Path | None = None, precision: str = "fp32", cache: bool = True,
    cache_dir: str | Path | None = None,
) -> Components:
    """SD + ControlNet from one ldm-layout file; the architecture comes from `original_config` or,
    when absent, from the tensors' shapes; the tokenizer defaults to the bundled CLIP vocabulary.

    `precision` "fp16" holds the UNet, ControlNet and VAE in fp16. With `cache`, the converted
    weights are written to the weights cache (under `cache_dir`, default the cache root) keyed by
    the file's content hash, and a later load maps them from there: its networks are filled on
    first use, so a backend whose exports are cached never reads them.
    """
    check_choice("precision", precision, PRECISIONS)
    path = Path(checkpoint)
    if not path.is_file():
        raise missing_checkpoint(path)
    given_config = load_original_config(original_config) if original_config else None
    clip_config = None
    if text_encoder_config is not None:
        cfg_path = Path(text_encoder_config)
        cfg_path = cfg_path / "config.json" if cfg_path.is_dir() else cfg_path
        if not cfg_path.is_file():
            raise WeightsError(f"text encoder config not found: {cfg_path}")
        clip_config = json.loads(cfg_path.read_text())
    tok = load_tokenizer(tokenizer)
    source = f"single-file:{path}"
    root = cache_dir_for(cache_dir) if cache else None

    def key_for(digest: str) -> str:
        return weights_key(kind="ldm-single-file", sha256=digest, original_config=given_config,
                           text_encoder_config=clip_config, special_ids=special_token_ids(tok))

    digest = remembered_hash(path, root) if root is not None else None
    if root is not None and digest is not None and (meta := find_entry(root, key_for(digest), precision)):
        return lazy_components(root, key_for(digest), precision, meta, tok, source)
    state = read_state_dict(path)  # memory-mapped: only the pickle's index is read here
    configs, states, networks = convert_state_dict(state, given_config or infer_original_config(state), tok,
                                                   clip_config, path)
    if root is not None:
        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:  # the content hash, for the key, is read while the converted tensors are written
            hashing = pool.submit(hash_file_cached, path, root) if digest is None else None
            key, meta = write_entry(root, lambda: key_for(hashing.result() if hashing else str(digest)), precision,
                                    configs, states, source)
        finally:
            pool.shutdown(wait=False)
        if meta is not None:
            return lazy_components(root, key, precision, meta, tok, source)
    return _assembled(tok, networks, states, precision, source, lambda: key_for(hash_file_cached(path, root)))


def load_controlnet_file(path: str | Path) -> Any:
    """A ControlNet alone from one file (ldm keys, with or without the 'control_model.' prefix);
    its architecture is read off its shapes."""
    from diffusers import ControlNetModel
    from diffusers.loaders import single_file_utils as sfu

    path = Path(path)
    state = read_state_dict(path)
    if not any(k.startswith(CONTROL_PREFIX) for k in state):
        state = {CONTROL_PREFIX + k: v for k, v in state.items()}
    params = infer_unet_params(state, CONTROL_PREFIX)
    config = {"model": {"params": {"control_stage_config": {"params": params},
                                   "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    control_config = _controlnet_config(config, state)
    with empty_init():
        controlnet = ControlNetModel(**control_config)
    converted = sfu.convert_controlnet_checkpoint(state, control_config)
    check_weights(controlnet, converted, "ControlNet", path)
    return assign_weights(controlnet, converted, torch.float32)
