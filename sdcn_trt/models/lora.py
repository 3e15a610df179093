"""LoRA files in the kohya (diffusers or ldm names) and diffusers/PEFT layouts, read into one form
and merged into the torch weights of the UNet and the text encoder, with an exact undo.

Layouts read (safetensors, or a torch pickle of tensors):
- kohya: `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te_text_model_encoder_layers_0_self_attn_q_proj...`; the UNet
  also with ldm names (`lora_unet_input_blocks_1_1_proj_in`), mapped through ldm_layout's tables;
  LoCon convolutions (down (r, in, kh, kw), up (out, r, 1, 1)).
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight` (or `.lora.down` / `.lora.up`,
  and the older `attn1.processor.to_q_lora.down` / `text_encoder.<module>.lora_linear_layer.down`),
  `text_encoder.text_model.<module>...`, optional `<module>.alpha`, and the `lora_adapter_metadata`
  diffusers writes into the safetensors header (`unet.lora_alpha`, `alpha_pattern`, `use_rslora`).
The merged weight is W + strength * (alpha / rank) * up @ down (alpha absent: alpha = rank; rsLoRA:
alpha / sqrt(rank)), as diffusers' `fuse_lora(lora_scale=strength)` computes it.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sdcn_trt.cache import hash_file
from sdcn_trt.models.single_file import read_state_dict
from sdcn_trt.models.components import Components
from sdcn_trt.errors import InputError, WeightsError
from sdcn_trt.models.ldm_layout import unet_ldm_names

logger = logging.getLogger(__name__)

STRENGTH_LIMIT = 4.0  # |strength| above this turns any LoRA into noise; refused as a typo
TARGETS = ("unet", "text_encoder")  # the Components networks a LoRA file can address
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_DOTTED_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
# (suffix, role): the down (A) and up (B) factors and the alpha of each layout
_ROLES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
          (".lora_B.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
          ("_lora.down.weight", "down"), ("_lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
          (".lora_linear_layer.up.weight", "up"), (".alpha", "alpha"))
SHOWN = 5  # how many offending keys an error lists
_OLD_CLIP_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass(frozen=True)
class LoraModule:
    """The low-rank update of one Linear or Conv2d weight."""

    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    scale: float  # alpha / r (rsLoRA: alpha / sqrt(r)); 1 when the file gives no alpha
    key: str  # the file's name for it, for messages

    def delta(self, shape: torch.Size, strength: float) -> torch.Tensor:
        """strength * scale * up @ down, float32, reshaped to the weight's `shape`."""
        scale = self.scale * strength
        update = self.up.float().flatten(1) @ self.down.float().flatten(1)  # (out, in * kh * kw)
        return (update * scale).reshape(shape)


@dataclass
class Lora:
    """A LoRA file resolved against one model: (network, module name in the diffusers model) -> update."""

    path: str
    digest: str  # sha256 of the file: names the LoRA in cache keys and logs
    modules: dict[tuple[str, str], LoraModule]

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass
class LoraMerge:
    """What merge_lora changed: the original weights (exact copies) and the model's source string."""

    originals: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (network, parameter) -> weight
    source: str = ""
    applied: list[tuple[str, float]] = field(default_factory=list)  # (file name, strength)


def check_strength(strength: object) -> float:
    """The strength as a float; InputError unless it is a finite number in [-STRENGTH_LIMIT, STRENGTH_LIMIT]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise InputError(f"LoRA strength must be a finite number, got {strength!r}")
    if abs(strength) > STRENGTH_LIMIT:
        raise InputError(f"LoRA strength {strength} is out of range: expected -{STRENGTH_LIMIT:g} .. {STRENGTH_LIMIT:g} "
                         f"(1.0 is the trained strength, 0 is no effect)")
    return float(strength)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'PATH' or 'PATH:STRENGTH' (the CLI's --lora) -> (path, strength); strength 1.0 by default."""
    path, sep, tail = text.rpartition(":")
    if not (sep and path):
        return text, 1.0
    try:
        strength = float(tail)
    except ValueError:
        if re.fullmatch(r"[-+.\deE]+", tail):
            raise InputError(f"--lora {text!r}: {tail!r} is not a number; expected PATH[:STRENGTH]") from None
        return text, 1.0  # a colon inside the file name
    return path, check_strength(strength)


def _split_key(key: str) -> tuple[str, str] | None:
    """(module key, role) for a LoRA tensor name, None when no layout knows the suffix."""
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            if suffix.startswith("_lora."):  # diffusers' old spelling: attn1.processor.to_q_lora -> attn1.to_q
                head, _, last = base.replace(".processor.", ".").rpartition(".")
                names = _OLD_CLIP_NAMES if head.endswith(".self_attn") else {"to_out": "to_out.0"}
                base = f"{head}.{names.get(last, last)}"
            return base, role
    return None


def _module_tables(components: Components) -> dict[str, dict[str, str]]:
    """Per target network: every name a file may use for a Linear/Conv2d -> its module name. Names
    come dotted (diffusers) and underscored (kohya); the UNet's also in ldm spelling; the text
    encoder's also under `text_model.` (files keep that prefix; transformers 5 dropped the level)."""
    tables: dict[str, dict[str, str]] = {}
    for target in TARGETS:
        model = getattr(components, target)
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        aliases = {n: n for n in names}
        if target == "unet":
            ldm = unet_ldm_names(model)
            aliases.update({ldm[n + ".weight"][: -len(".weight")]: n for n in names if n + ".weight" in ldm})
        if target == "text_encoder" and not hasattr(model, "text_model"):
            aliases.update({"text_model." + n: n for n in names})
        tables[target] = {**aliases, **{a.replace(".", "_"): n for a, n in aliases.items()}}
    return tables


def _resolve(base: str, tables: dict[str, dict[str, str]]) -> tuple[str, str] | None:
    """(network, module name) that a LoRA module key addresses, None when it addresses nothing here."""
    for prefix, target in (*_KOHYA_PREFIXES.items(), *_DOTTED_PREFIXES.items()):
        if base.startswith(prefix):
            name = tables[target].get(base[len(prefix):])
            return (target, name) if name is not None else None
    return None


def adapter_configs(path: Path) -> dict[str, dict]:
    """Per target network, the PEFT LoraConfig fields diffusers stored in a safetensors header
    (`lora_adapter_metadata`: {"unet.lora_alpha": 8, "unet.alpha_pattern": {...}, ...}); {} if none."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        data = json.loads(raw) if raw else {}
    except (OSError, ValueError) as exc:
        raise WeightsError(f"LoRA {path}: unreadable adapter metadata: {exc}") from exc
    configs: dict[str, dict] = {}
    for key, value in data.items():
        target, _, name = key.partition(".")
        configs.setdefault(target, {})[name] = value
    return configs


def _scale(rank: int, alpha: torch.Tensor | None, module: str, config: dict) -> float:
    """alpha / rank from the file's alpha tensor, else its adapter config (alpha_pattern as PEFT
    matches it, then lora_alpha; rsLoRA divides by sqrt(rank)), else 1."""
    if alpha is not None:
        return float(alpha.item()) / rank
    value: float = rank
    patterns = config.get("alpha_pattern") or {}
    pattern = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
    if pattern is not None:
        value = float(patterns[pattern])
    elif config.get("lora_alpha") is not None:
        value = float(config["lora_alpha"])
    return value / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _check_shapes(key: str, weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why the factors do not fit the weight (None when they do). A Linear (out, in) takes down
    (r, in) and up (out, r); a Conv2d (out, in, kh, kw) takes down (r, in, kh, kw) and up
    (out, r, 1, 1), and 1x1 convolutions and Linears take either spelling."""
    out_ch, in_ch, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    pointwise = kernel in ((), (1, 1))
    down_ok = down.shape[1:2] == (in_ch,) and (
        (down.ndim == 2 and pointwise) or (down.ndim == 4 and (tuple(down.shape[2:]) == kernel
                                                               or (pointwise and down.shape[2:] == (1, 1)))))
    up_ok = up.shape[0:1] == (out_ch,) and (up.ndim == 2 or (up.ndim == 4 and up.shape[2:] == (1, 1)))
    if down_ok and up_ok and down.shape[0] != up.shape[1]:
        return f"{key}: down rank {down.shape[0]} != up rank {up.shape[1]}"
    if not (down_ok and up_ok):
        kernel_text = "".join(f", {k}" for k in kernel)
        return (f"{key}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the weight {tuple(weight.shape)} "
                f"(expected down (r, {in_ch}{kernel_text}) and up ({out_ch}, r{', 1, 1' if kernel else ''}))")
    return None


def load_lora(path: str | Path, components: Components) -> Lora:
    """Read a LoRA file and resolve every module it holds in `components`.

    WeightsError, naming the model, when any key matches nothing (an SDXL LoRA on SD1.5, a
    DoRA file, an unknown layout), when factors come without their pair, or when shapes do not fit.
    """
    path = Path(path)
    state = read_state_dict(path)
    digest = hash_file(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = tensor
    tables = _module_tables(components)
    configs = adapter_configs(path)
    dora = [t for t, c in configs.items() if c.get("use_dora")]
    if dora:
        raise WeightsError(f"LoRA {path}: DoRA adapters ({', '.join(dora)}) are not supported; "
                           f"plain LoRA (kohya or diffusers/PEFT) files are")
    modules: dict[tuple[str, str], LoraModule] = {}
    unmatched, unpaired, misfit = list(unknown), [], []
    for base, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            unpaired.append(f"{base} (has {', '.join(sorted(parts))}; needs down and up)")
            continue
        where = _resolve(base, tables)
        if where is None:
            unmatched.append(base)
            continue
        weight = getattr(components, where[0]).get_submodule(where[1]).weight
        why = _check_shapes(base, weight, parts["down"], parts["up"])
        if why:
            misfit.append(why)
            continue
        scale = _scale(int(parts["down"].shape[0]), parts.get("alpha"), where[1], configs.get(where[0], {}))
        modules[where] = LoraModule(parts["down"], parts["up"], scale, base)
    model = f"the UNet and text encoder of {components.source}"
    if unmatched or not modules and not (unpaired or misfit):
        total = len(groups) + len(unknown)
        raise WeightsError(
            f"LoRA {path}: {len(unmatched)} of {total} entries match no Linear/Conv2d module of {model}: "
            f"{', '.join(unmatched[:SHOWN]) or '(the file is empty)'}{' ...' if len(unmatched) > SHOWN else ''}. "
            f"Expected kohya names (lora_unet_down_blocks_0_..., lora_unet_input_blocks_1_1_..., "
            f"lora_te_text_model_encoder_layers_0_...) or diffusers/PEFT names (unet.<module>.lora_A.weight, "
            f"text_encoder.text_model.<module>.lora_B.weight): is it a LoRA for another model (SDXL, SD2)?")
    if unpaired:
        raise WeightsError(f"LoRA {path}: factors without their pair: {'; '.join(unpaired[:SHOWN])}")
    if misfit:
        raise WeightsError(f"LoRA {path}: {len(misfit)} modules do not fit {model}: {'; '.join(misfit[:SHOWN])}"
                           f"{' ...' if len(misfit) > SHOWN else ''}")
    logger.info("LoRA %s: %d modules (%s)", path.name, len(modules),
                ", ".join(f"{t}: {sum(1 for k in modules if k[0] == t)}" for t in TARGETS))
    return Lora(str(path), digest, modules)


def merge_lora(components: Components, lora: Lora, strength: float, record: LoraMerge | None = None) -> LoraMerge:
    """W += strength * alpha / r * up @ down for every module of `lora`, in place, in float32.

    Returns the undo record (extended when one is given: merge several LoRAs into one record);
    `unmerge_lora` restores the exact original weights. `components.source` gains the LoRA's
    digest and strength, for logs; cache keys (`Components.weights_id`) notice the changed weights
    by themselves.
    """
    strength = check_strength(strength)
    if record is None:
        record = LoraMerge(source=components.source)
    with torch.no_grad():
        for (target, name), module in lora.modules.items():
            weight = getattr(components, target).get_submodule(name).weight  # (out, in[, kh, kw])
            record.originals.setdefault((target, name + ".weight"), weight.detach().clone())
            weight.add_(module.delta(weight.shape, strength).to(weight.dtype))
    record.applied.append((lora.name, strength))
    components.source = f"{components.source}+lora:{lora.digest[:16]}@{strength:g}"
    logger.info("merged LoRA %s at strength %g into %d modules", lora.name, strength, len(lora.modules))
    return record


def unmerge_lora(components: Components, record: LoraMerge) -> None:
    """Put back the weights `record` saved (bit-exact) and the model's source string."""
    with torch.no_grad():
        for (target, name), original in record.originals.items():
            getattr(components, target).get_parameter(name).copy_(original)
    components.source = record.source
    logger.info("unmerged LoRA %s", ", ".join(n for n, _ in record.applied) or "(none)")


def apply_loras(components: Components, loras: list[tuple[str | Path, float]]) -> LoraMerge:
    """Load and merge several (path, strength) LoRAs into one undo record; strengths are checked
    before any file is read, and a failure part-way leaves the weights as they were."""
    checked = [(path, check_strength(strength)) for path, strength in loras]
    record = LoraMerge(source=components.source)
    try:
        for path, strength in checked:
            merge_lora(components, load_lora(path, components), strength, record)
    except Exception:
        unmerge_lora(components, record)
        raise
    return record
