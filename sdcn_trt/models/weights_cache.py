"""The converted-weights cache: diffusers-layout weights as memory-mapped safetensors, keyed by content.

An entry is a folder `<cache>/weights/<key>-<precision>/` holding `weights.safetensors` (every
network's tensors, prefixed by the network's name) and `meta.json` (the key, the networks' configs,
the file's size and a sampled digest). A later load builds the networks on the meta device from the
configs and memory-maps the file when a network is first used: no conversion, no initialisation,
and nothing read that is not used. Entries are written in a temporary folder and renamed into place
complete; one that is incomplete, stale or damaged is detected and rebuilt; a cache that cannot be
written is a warning, and loading goes on without it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from sdcn_trt.cache import cache_root, hash_json
from sdcn_trt.models.components import NETWORKS, Components
from sdcn_trt.config import PRECISIONS, check_choice
from sdcn_trt.models.weights import empty_init, map_safetensors, sample_digest, write_safetensors

logger = logging.getLogger(__name__)

WEIGHTS_FORMAT = 1  # bump when the conversion or the entry layout changes: old entries become stale
WEIGHTS_FILE, META_FILE = "weights.safetensors", "meta.json"


def versions() -> dict[str, str]:
    """The libraries whose code decides the converted (or, for presets, drawn) tensors."""
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "format": str(WEIGHTS_FORMAT)}


def weights_key(**what: Any) -> str:
    """The content key of a set of weights: what they came from, plus the converting libraries."""
    return hash_json({**what, "versions": versions()})


def network_dtype(name: str, precision: str) -> torch.dtype:
    """The dtype network `name` holds at `precision`: CLIP's text encoder stays fp32 (fp16 overflows)."""
    return torch.float16 if precision == "fp16" and name != "text_encoder" else torch.float32


def plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config as JSON gives it back (tuples become lists), so a fresh and a cached load build alike."""
    return json.loads(json.dumps(dict(config)))


def build_empty(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, nn.Module]:
    """The four networks from their configs, parameters on the meta device (no memory, no init)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with empty_init():
        return {"text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
                "unet": UNet2DConditionModel(**configs["unet"]),
                "controlnet": ControlNetModel(**configs["controlnet"]),
                "vae": AutoencoderKL(**configs["vae"])}


def cache_dir_for(cache_dir: str | Path | None) -> Path | None:
    """The cache root to use, or None (with a warning) when it cannot be created."""
    try:
        return Path(cache_dir) if cache_dir is not None else cache_root()
    except OSError as exc:
        logger.warning("cannot use the cache folder (%s); loading without the weights cache", exc)
        return None


def entry_folder(root: Path, key: str, precision: str) -> Path:
    return root / "weights" / f"{key[:24]}-{precision}"


def find_entry(root: Path, key: str, precision: str, quiet: bool = False) -> dict[str, Any] | None:
    """The entry's metadata when it is complete and intact, else None (saying why when it exists)."""
    folder = entry_folder(root, key, precision)
    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / META_FILE).read_text())
        problem = ("it is stale (another key or format)" if meta.get("key") != key or meta.get("precision") != precision
                   or meta.get("format") != WEIGHTS_FORMAT
                   else "its weights file has another size" if (folder / WEIGHTS_FILE).stat().st_size != meta["size"]
                   else "its weights file is damaged" if sample_digest(folder / WEIGHTS_FILE) != meta["sample_digest"]
                   else "")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"it is incomplete or unreadable ({exc.__class__.__name__}: {exc})"
    if problem:
        if not quiet:
            logger.warning("weights cache entry %s is not usable: %s; rebuilding it", folder, problem)
        return None
    return meta


def write_entry(root: Path, key: str | Callable[[], str], precision: str, configs: Mapping[str, Mapping[str, Any]],
                states: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> tuple[str, dict[str, Any] | None]:
    """Write every network's tensors (cast to `precision`) and configs as one entry. `key` may be a
    function (a content hash still being read): it is called once the tensors are written. Returns
    (key, the entry's metadata); the metadata is None, with a warning, when the cache cannot be written."""
    check_choice("precision", precision, PRECISIONS)
    parent, work, folder = root / "weights", None, None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        work = parent / f".new-{precision}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        work.mkdir()  # (mkdir, not mkdtemp: the entry gets the umask's permissions, not 0700)
        tensors = {f"{net}.{k}": v for net in NETWORKS for k, v in states[net].items()}
        dtypes = {f"{net}.{k}": network_dtype(net, precision) if v.is_floating_point() else v.dtype
                  for net in NETWORKS for k, v in states[net].items()}
        clock = time.perf_counter()
        write_safetensors(work / WEIGHTS_FILE, tensors, dtypes, {"source": source, "precision": precision})
        written = time.perf_counter() - clock
        key = key() if callable(key) else key
        folder = entry_folder(root, key, precision)
        meta = find_entry(root, key, precision, quiet=True)
        if meta is None:  # (another process may have written it meanwhile)
            meta = {"key": key, "precision": precision, "format": WEIGHTS_FORMAT, "source": source,
                    "configs": {n: plain(configs[n]) for n in NETWORKS}, "size": (work / WEIGHTS_FILE).stat().st_size,
                    "sample_digest": sample_digest(work / WEIGHTS_FILE)}
            (work / META_FILE).write_text(json.dumps(meta, indent=1))
            if folder.exists():
                shutil.rmtree(folder)
            work.rename(folder)
            work = None
            logger.info("wrote weights cache entry %s (%.2f GB) in %.1f s (+%.1f s waiting for the key)", folder,
                        meta["size"] / 1e9, written, time.perf_counter() - clock - written)
        return key, meta
    except OSError as exc:
        logger.warning("cannot write the weights cache entry %s (%s); loading goes on without it",
                       folder or parent, exc)
        return "", None
    finally:
        if work is not None and work.exists():
            shutil.rmtree(work, ignore_errors=True)


def entry_loader(folder: Path) -> Any:
    """A Components loader giving network `name`'s tensors from the entry, memory-mapped with their
    pages mapped in at once (a network is loaded when it is about to run)."""
    def load(name: str) -> dict[str, torch.Tensor]:
        return map_safetensors(folder / WEIGHTS_FILE, prefix=name + ".")

    return load


def lazy_components(root: Path, key: str, precision: str, meta: dict[str, Any], tokenizer: Any,
                    source: str) -> Components:
    """Components on a cache entry: networks built empty from its configs, loaded on first use."""
    folder = entry_folder(root, key, precision)
    logger.debug("%s: using weights cache entry %s", source, folder)
    networks = build_empty(meta["configs"])
    return Components(tokenizer, networks["text_encoder"], networks["unet"], networks["controlnet"], networks["vae"],
                      source=source, weights_key=key, loader=entry_loader(folder), precision=precision).eval_()
