"""Loading SD1.5 + ControlNet: diffusers folders, the built-in presets (seeded random weights, or
the small model trained here that ships inside the package)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sdcn_trt.cache import atomic_path, hash_file, hash_file_cached, hash_json
from sdcn_trt.models.single_file import load_controlnet_file
from sdcn_trt.models.components import SD15_SCALING_FACTOR, Components
from sdcn_trt.config import PRECISIONS, check_choice
from sdcn_trt.errors import InputError, WeightsError
from sdcn_trt.models.tokenizer import load_tokenizer, special_token_ids
from sdcn_trt.samplers import read_scheduler_config
from sdcn_trt.models.weights_cache import cache_dir_for, find_entry, lazy_components, weights_key, write_entry

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Presets: architectures with seeded random weights (diffusers-style configs).
# ---------------------------------------------------------------------------------------------
def sd_configs(channels: tuple[int, ...], layers: int, vae_channels: tuple[int, ...], vae_layers: int,
               text_width: int, text_ffn: int, text_layers: int) -> dict[str, dict[str, Any]]:
    """diffusers configs with SD1.5's structure: cross-attention on every UNet level but the last,
    8 heads, an 8x VAE (the ControlNet hint block always downsamples 8x), CLIP with 64-wide heads."""
    levels = len(channels)
    unet = dict(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=layers,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=text_width, attention_head_dim=8, norm_num_groups=32,
    )
    controlnet = {k: v for k, v in unet.items() if k not in ("sample_size", "out_channels", "up_block_types")}
    controlnet.update(conditioning_embedding_out_channels=(16, 32, 96, 256), conditioning_channels=3)
    vae = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=vae_channels, layers_per_block=vae_layers,
        latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=SD15_SCALING_FACTOR,
    )
    text = dict(
        vocab_size=49408, hidden_size=text_width, intermediate_size=text_ffn,
        num_hidden_layers=text_layers, num_attention_heads=text_width // 64, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=text_width,
    )
    return {"unet": unet, "controlnet": controlnet, "vae": vae, "text_encoder": text}


def _tiny_configs() -> dict[str, dict[str, Any]]:
    """Two UNet levels of 32/64 channels, a 32-channel VAE, a 2-layer 128-wide CLIP (8.6 M parameters)."""
    return sd_configs((32, 64), 1, (32, 32, 32, 32), 1, 128, 256, 2)


def _sd15_configs() -> dict[str, dict[str, Any]]:
    """SD1.5's own architecture (UNet 859.5 M, ControlNet 361.3 M parameters, CLIP ViT-L/14 text)."""
    return sd_configs((320, 640, 1280, 1280), 2, (128, 256, 512, 512), 2, 768, 3072, 12)


PRESETS: dict[str, Callable[[], dict[str, dict[str, Any]]]] = {"tiny": _tiny_configs, "sd15-random": _sd15_configs}

# Trained presets: weights + configs inside the package, written by scripts/train_tiny.py.
TRAINED_PRESETS: dict[str, Path] = {"tiny-trained": Path(__file__).parent / "tiny_trained"}
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
RETRAIN_HINT = ("regenerate it with `python scripts/train_tiny.py` (about 70 minutes on 2 CPU cores; "
                "about 35 with `--vae-from` a preset folder whose VAE is intact)")


def preset_names() -> list[str]:
    """Every name `load_preset` accepts."""
    return sorted([*PRESETS, *TRAINED_PRESETS])


def trained_configs() -> dict[str, dict[str, Any]]:
    """tiny-trained's architecture: UNet/ControlNet and VAE 64 channels wide (32 would make the
    outermost GroupNorm(32) an instance norm that erases each channel's mean, i.e. the colours), and
    the tiny preset's CLIP (128 wide, 2 layers): 11.7 M parameters, 23 MB in fp16."""
    return sd_configs((64, 64, 64), 1, (64, 64, 64, 64), 1, 128, 256, 2)


def build_from_configs(configs: dict[str, dict[str, Any]], seed: int, tokenizer: Any, source: str) -> Components:
    """Instantiate the networks from configs with weights drawn from `torch.manual_seed(seed)`.

    ControlNet's zero convolutions are re-drawn too: zero residuals would make the control path
    invisible to every parity test.
    """
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"], **special_token_ids(tokenizer)))
        unet = UNet2DConditionModel(**configs["unet"])
        controlnet = ControlNetModel(**configs["controlnet"])
        zero_convs = list(controlnet.controlnet_down_blocks) + [
            controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out
        ]
        for conv in zero_convs:
            conv.reset_parameters()
        vae = AutoencoderKL(**configs["vae"])
    return Components(tokenizer, text_encoder, unet, controlnet, vae, source=source).eval_()


def load_preset(name: str, seed: int = 0, tokenizer: str | Path | None = None, precision: str = "fp32",
                cache: bool = True, cache_dir: str | Path | None = None) -> Components:
    """A built-in model: 'tiny-trained' (a small model trained here on scikit-image's photos; the
    demo's), or an architecture with seeded random weights: 'tiny' (tests) or 'sd15-random'."""
    if name in TRAINED_PRESETS:
        if seed != 0:
            raise InputError(f"preset {name!r} has trained weights, so it takes no seed (got {seed}); "
                             f"seeds pick the weights of the random presets: {', '.join(sorted(PRESETS))}")
        return load_trained_preset(TRAINED_PRESETS[name], tokenizer, name=name, precision=precision)
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; available presets: {', '.join(preset_names())}")
    return cached_preset(name, PRESETS[name](), seed, load_tokenizer(tokenizer), precision, cache, cache_dir)


def cached_preset(name: str, configs: dict[str, dict[str, Any]], seed: int, tokenizer: Any, precision: str = "fp32",
                  cache: bool = True, cache_dir: str | Path | None = None) -> Components:
    """A seeded random preset, drawn once: later loads map the drawn weights from the weights cache
    (keyed by the preset, its configs, the seed and the library versions that draw them)."""
    check_choice("precision", precision, PRECISIONS)
    source = f"preset:{name}:seed={seed}"
    full = {**configs, "text_encoder": {**configs["text_encoder"], **special_token_ids(tokenizer)}}
    key = weights_key(kind="preset", name=name, configs=full, seed=seed)
    root = cache_dir_for(cache_dir) if cache else None
    if root is not None and (meta := find_entry(root, key, precision)) is not None:
        return lazy_components(root, key, precision, meta, tokenizer, source)
    components = build_from_configs(configs, seed, tokenizer, source=source)
    if root is not None:
        write_entry(root, key, precision, full, {n: m.state_dict() for n, m in components.modules().items()}, source)
    if precision == "fp16":
        for name_ in ("unet", "controlnet", "vae"):
            components.network(name_).half()
        components.precision = precision
    return components.with_weights_key(key)


def _materialise_position_ids(module: torch.nn.Module) -> None:
    """CLIP's `position_ids` (arange(77), a buffer no state dict holds) made real after a meta-device build."""
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta:
            assert name.endswith("position_ids"), f"buffer {name} is not in the weights file"
            owner, _, leaf = name.rpartition(".")
            ids = torch.arange(buffer.shape[-1]).expand(buffer.shape).contiguous()  # (1, 77)
            module.get_submodule(owner).register_buffer(leaf, ids, persistent=False)


def save_trained_preset(components: Components, folder: str | Path, configs: dict[str, dict[str, Any]],
                        training: dict[str, Any] | None = None) -> Path:
    """Write one fp16 safetensors file (keys '<network>.<parameter>') and config.json (the four
    configs, the file's sha256, how it was trained) into `folder`; returns the weights path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"{name}.{key}": (value.to(torch.float16) if value.is_floating_point() else value).contiguous()
             for name, module in components.modules().items() for key, value in module.state_dict().items()}
    weights = folder / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "sdcn_trt trained preset", "dtype": "float16"})
    record = {"weights": WEIGHTS_FILE, "sha256": hash_file(weights), "configs": configs, "training": training or {}}
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return weights


def load_trained_preset(folder: str | Path, tokenizer: str | Path | None = None, name: str = "trained",
                        precision: str = "fp32") -> Components:
    """A model written by `save_trained_preset`: weights stored in fp16, run in fp32 (or, with
    precision="fp16", the UNet, ControlNet and VAE in fp16). The file's sha256 is checked against
    config.json, so a damaged file is named rather than run; it is also the weights' content key
    (exports are cached by it). Nothing goes to the weights cache: the file is already small."""
    check_choice("precision", precision, PRECISIONS)
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise WeightsError(f"preset config not found: {config_path}; {RETRAIN_HINT}")
    try:
        record = json.loads(config_path.read_text())
        configs, expected = record["configs"], record["sha256"]
        weights = folder / record["weights"]
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"preset config {config_path} is damaged ({exc!r}); {RETRAIN_HINT}") from exc
    if not weights.is_file():
        raise WeightsError(f"preset weights not found: {weights}; {RETRAIN_HINT}")
    actual = hash_file(weights)
    if actual != expected:
        raise WeightsError(f"preset weights {weights} are damaged: sha256 {actual[:16]}..., expected "
                           f"{expected[:16]}... (from {config_path.name}); {RETRAIN_HINT}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"cannot read preset weights {weights} ({exc}); {RETRAIN_HINT}") from exc
    tok = load_tokenizer(tokenizer)
    with torch.device("meta"):  # no random init: every parameter comes from the file
        modules = {
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"], **special_token_ids(tok))),
            "unet": UNet2DConditionModel(**configs["unet"]),
            "controlnet": ControlNetModel(**configs["controlnet"]),
            "vae": AutoencoderKL(**configs["vae"]),
        }
    for net, module in modules.items():
        part = {k[len(net) + 1:]: v.float() if v.is_floating_point() else v
                for k, v in state.items() if k.startswith(net + ".")}
        try:
            module.load_state_dict(part, strict=True, assign=True)
        except RuntimeError as exc:
            raise WeightsError(f"{net} weights in {weights} do not match {config_path.name}: {exc}; {RETRAIN_HINT}") from exc
        _materialise_position_ids(module)
    components = Components(tok, modules["text_encoder"], modules["unet"], modules["controlnet"], modules["vae"],
                            source=f"preset:{name}:sha256={actual[:16]}").eval_()
    if precision == "fp16":
        for net in ("unet", "controlnet", "vae"):
            components.network(net).half()
        components.precision = precision
    return components.with_weights_key(weights_key(kind="trained-preset", sha256=actual))


# ---------------------------------------------------------------------------------------------
# diffusers-format folders
# ---------------------------------------------------------------------------------------------
def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise WeightsError(f"{what} not found: {path}")
    return path


def _load_diffusers_model(cls: Any, folder: Path, what: str) -> Any:
    _require(folder / "config.json", f"{what} config")
    weights = [folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                                    "model.safetensors", "pytorch_model.bin")]
    index = list(folder.glob("*.index.json"))
    if not any(w.is_file() for w in weights) and not index:
        raise WeightsError(f"{what} weights not found in {folder}: expected one of {', '.join(w.name for w in weights)}")
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"cannot load {what} from {folder}: {exc}") from exc


def load_controlnet(path: str | Path) -> Any:
    """One ControlNet: a diffusers folder (config.json + weights) or a checkpoint file in ldm layout."""
    from diffusers import ControlNetModel

    path = _require(Path(path), "ControlNet")
    if path.is_dir():
        return _load_diffusers_model(ControlNetModel, path, "ControlNet").eval().requires_grad_(False)
    return load_controlnet_file(path)


def with_controlnets(components: Components, paths: Sequence[str | Path]) -> Components:
    """`components` with further ControlNets (Multi-ControlNet) loaded from `paths`; each is checked
    against the UNet (widths, text width) before any work."""
    if not paths:
        return components
    more = components.more_controlnets + tuple(load_controlnet(p) for p in paths)
    return components.with_more_controlnets(more, components.source + "+" + "+".join(str(p) for p in paths))


def load_diffusers(sd_dir: str | Path, controlnet: str | Path | Sequence[str | Path],
                   tokenizer: str | Path | None = None) -> Components:
    """An SD1.5 pipeline folder (tokenizer/, text_encoder/, unet/, vae/) plus a ControlNet folder
    (config.json + weights) or a single ControlNet checkpoint file in ldm layout — or a list of
    them (Multi-ControlNet; the first is fed the photo's edge map)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    sd_dir = _require(Path(sd_dir), "Stable Diffusion folder")
    paths = [controlnet] if isinstance(controlnet, (str, Path)) else list(controlnet)
    if not paths:
        raise InputError("give at least one ControlNet")
    controlnet_path = _require(Path(paths[0]), "ControlNet")
    tok_dir = Path(tokenizer) if tokenizer is not None else sd_dir / "tokenizer"
    tok = load_tokenizer(tok_dir if tok_dir.exists() else None)
    text_encoder = _load_diffusers_model(CLIPTextModel, sd_dir / "text_encoder", "text encoder")
    unet = _load_diffusers_model(UNet2DConditionModel, sd_dir / "unet", "UNet")
    vae = _load_diffusers_model(AutoencoderKL, sd_dir / "vae", "VAE")
    weight_files = [controlnet_path] if controlnet_path.is_file() else []
    weight_files += [f for d in (sd_dir / "text_encoder", sd_dir / "unet", sd_dir / "vae", controlnet_path)
                     if d.is_dir() for f in sorted(d.iterdir()) if f.suffix in (".safetensors", ".bin", ".json")]
    components = Components(tok, text_encoder, unet, load_controlnet(controlnet_path), vae,
                            source=f"diffusers:{sd_dir}+{controlnet_path}",
                            weights_key=lambda: hash_json({"diffusers-folders": {
                                f"{f.parent.name}/{f.name}": hash_file_cached(f) for f in weight_files}})).eval_()
    components.scheduler_config = read_scheduler_config(sd_dir)
    return with_controlnets(components, paths[1:])


def save_diffusers(components: Components, sd_dir: str | Path, controlnet_dir: str | Path) -> None:
    """Write components as diffusers folders (the layout load_diffusers reads)."""
    sd_dir, controlnet_dir = Path(sd_dir), Path(controlnet_dir)
    components.tokenizer.save_pretrained(str(sd_dir / "tokenizer"))
    components.text_encoder.save_pretrained(str(sd_dir / "text_encoder"))
    components.unet.save_pretrained(str(sd_dir / "unet"))
    components.vae.save_pretrained(str(sd_dir / "vae"))
    components.controlnet.save_pretrained(str(controlnet_dir))
