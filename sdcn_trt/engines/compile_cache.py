"""torch.compile's caches kept in the sdcn_trt cache, so a compile is paid once per machine, not per process.

Inductor keeps its FX-graph and AOTAutograd caches (and Triton its kernels) under TORCHINDUCTOR_CACHE_DIR,
which by default is a folder in the temp directory: a new temp folder (a container, a test run, a batch
worker) compiles everything again. `use_compile_cache` points it at a folder of the sdcn_trt cache keyed by
what compiled code depends on outside the graph (torch and Triton versions, Python, the device), so another
torch, Triton or GPU gets a folder of its own and never reads a wrong entry; inductor's own keys (the graph,
its input shapes and strides, the inductor config) tell apart the networks, shapes and FastPath switches
within it. After a network's first compile its Mega-Cache artifacts (torch.compiler.save_cache_artifacts:
the same caches as one file, with autotuning results) are saved there with their sha256, and loaded before
the next process compiles: a file whose hash does not match is discarded with one warning, never loaded.
The folder is private to the user (0700): what it holds is code that gets loaded. A TORCHINDUCTOR_CACHE_DIR
the user set is theirs: it is kept, and nothing is loaded into it or saved from it.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from sdcn_trt.cache import atomic_path, cache_root, hash_file, hash_json

logger = logging.getLogger(__name__)

INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
ARTIFACTS = "mega-cache"  # the Mega-Cache files' sub-folder: NAME.bin + NAME.json (its sha256 and key)
_loaded: set[Path] = set()  # folders whose artifacts this process has loaded
_set_by_us: set[str] = set()  # the TORCHINDUCTOR_CACHE_DIR values use_compile_cache wrote
_misses_saved = [0]  # inductor's FX-graph cache misses (new compiles) this process had at its last save


def device_identity(device: torch.device) -> dict[str, Any]:
    """What compiled kernels depend on about the device: the GPU's name, compute capability and CUDA
    version; on the CPU, the architecture and the processor's model name (inductor's C++ picks its ISA)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"type": "cuda", "name": torch.cuda.get_device_name(index),
                "capability": list(torch.cuda.get_device_capability(index)), "cuda": torch.version.cuda}
    return {"type": device.type, "machine": platform.machine(), "model": cpu_info("model name")}


def cpu_info(field: str) -> str:
    """The first `field` line of /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return str(triton.__version__)


def compile_cache_key(device: dict[str, Any], torch_version: str | None = None, triton: str | None = "auto",
                      python: str | None = None) -> dict[str, Any]:
    """The key of a compile cache folder: everything outside the graph that compiled code depends on."""
    return {"torch": torch_version or torch.__version__, "triton": triton_version() if triton == "auto" else triton,
            "python": python or f"{sys.version_info.major}.{sys.version_info.minor}", "device": device}


def compile_cache_dir(key: dict[str, Any], root: Path | None = None) -> Path:
    """The folder for `key` under the cache root, created private to the user (0700), with its key.json."""
    device = key["device"]
    label = "cuda-sm" + "".join(map(str, device["capability"])) if device["type"] == "cuda" else device["type"]
    folder = (root or cache_root()) / "torch_compile" / f"torch{key['torch'].split('+')[0]}-{label}-{hash_json(key)[:12]}"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in (folder.parent, folder):  # private to the user who made it (mkdir's mode is cut by the umask)
        info = path.stat()
        if info.st_mode & 0o077 and info.st_uid == os.getuid():
            os.chmod(path, 0o700)
    key_file = folder / "key.json"
    if not key_file.exists():
        with atomic_path(key_file) as tmp:
            tmp.write_text(json.dumps(key, indent=1))
    return folder


def _user_set_inductor_dir() -> str | None:
    """TORCHINDUCTOR_CACHE_DIR when the user chose it (not inductor, which writes its default there once it
    runs, nor an earlier use_compile_cache)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get(INDUCTOR_ENV)
    if not chosen or chosen in _set_by_us or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        return None
    return chosen


def use_compile_cache(device: torch.device, root: Path | None = None, artifacts: bool = True) -> Path | None:
    """Point inductor's (and so Triton's) caches at the keyed folder for `device` and, with `artifacts`, load
    the Mega-Cache artifacts saved there, once per process; returns the folder (where save_artifacts writes).
    None, and nothing changed, when the user set TORCHINDUCTOR_CACHE_DIR: that cache is theirs to manage.
    The inductor backend asks for the folder alone: AOTInductor's loader probes the CPU's vector ISA by
    compiling test programs there (5–7 s in a new temp folder, nothing once they are kept)."""
    user_dir = _user_set_inductor_dir()
    if user_dir is not None:
        logger.debug("compile cache: TORCHINDUCTOR_CACHE_DIR=%s is the user's; sdcn_trt's is not used", user_dir)
        return None
    folder = compile_cache_dir(compile_cache_key(device_identity(device)), root)
    if not os.access(folder, os.W_OK | os.X_OK):  # a prebuilt cache shared read-only: inductor writes as it goes
        raise PermissionError(13, "the compile cache folder is not writable", str(folder))
    os.environ[INDUCTOR_ENV] = str(folder / "inductor")
    _set_by_us.add(os.environ[INDUCTOR_ENV])
    if artifacts and folder not in _loaded:
        _loaded.add(folder)
        load_artifacts(folder)
    return folder


def load_artifacts(folder: Path) -> int:
    """Load every Mega-Cache file in `folder` whose sha256 matches its record; a file that does not match,
    cannot be read or that torch refuses is removed with one warning (the next compile rebuilds it).
    Returns how many were loaded."""
    loaded = 0
    for record_file in sorted((folder / ARTIFACTS).glob("*.json")):
        blob = record_file.with_suffix(".bin")
        try:
            record = json.loads(record_file.read_text())
            if not blob.exists() or hash_file(blob) != record["sha256"]:
                raise ValueError(f"{blob.name}'s sha256 does not match its record (truncated or changed)")
            if torch.compiler.load_cache_artifacts(blob.read_bytes()) is None:
                raise ValueError("torch could not read it")
        except Exception as exc:  # a bad entry is rebuilt, never fatal
            logger.warning("compile cache: discarded %s (%s: %s); the next compile writes it again", blob,
                           type(exc).__name__, exc)
            for path in (blob, record_file):
                path.unlink(missing_ok=True)
            continue
        logger.debug("compile cache: loaded %s (%d bytes)", blob, blob.stat().st_size)
        loaded += 1
    return loaded


def compiled_anything_new() -> bool:
    """Whether this process compiled a graph the cache did not hold since its last save (a warm process that
    only hit the cache has nothing new to save)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_miss"] > _misses_saved[0]


def save_artifacts(folder: Path, name: str, key: dict[str, Any]) -> Path | None:
    """Save this process's Mega-Cache artifacts (every compile so far) as `name` in `folder`, with their
    sha256 and `key` (what compiled: network, mode, FastPath); written whole or not at all. None when torch
    has nothing to save."""
    from torch._dynamo.utils import counters

    saved = torch.compiler.save_cache_artifacts()
    _misses_saved[0] = counters["inductor"]["fxgraph_cache_miss"]
    if saved is None:
        return None
    blob_bytes = saved[0]
    target = folder / ARTIFACTS / f"{name}.bin"
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_path(target) as tmp:
        tmp.write_bytes(blob_bytes)
    with atomic_path(target.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"sha256": hash_file(target), "bytes": len(blob_bytes), "key": key}, indent=1))
    logger.debug("compile cache: saved %s (%d bytes)", target, len(blob_bytes))
    return target
