"""The on-disk cache: where it lives, content hashes for keys, atomic file writes, and what it holds."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from sdcn_trt.errors import InputError

CACHE_ENV = "SDCN_TRT_CACHE"


def cache_root() -> Path:
    """$SDCN_TRT_CACHE, else ~/.cache/sdcn_trt."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdcn_trt")
    root.mkdir(parents=True, exist_ok=True)
    return root


def hash_json(obj: object) -> str:
    """Stable sha256 of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_module(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def hash_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (other threads never
    see a zero umask); elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    A crash or error mid-write leaves no file under the final name (and removes the temporary).
    The file gets the permissions open() would give it (0o666 less the umask), not mkstemp's 0o600.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_signature(path: Path) -> list[int]:
    """What changes when a file's content may have: size, mtime, ctime (any write or rename) and inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _memo_path(path: Path, root: Path | None) -> Path:
    return (Path(root) if root is not None else cache_root()) / "hashes" / f"{hash_json(str(path))[:32]}.json"


def remembered_hash(path: Path, root: Path | None = None) -> str | None:
    """The sha256 `hash_file_cached` remembered for this file, if its size, mtime, ctime and inode
    are unchanged since; None when there is none (nothing is read but the memo)."""
    path = Path(path).resolve()
    try:
        record = json.loads(_memo_path(path, root).read_text())
        if record.get("path") == str(path) and record.get("stat") == file_signature(path):
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None


def hash_file_cached(path: Path, root: Path | None = None) -> str:
    """sha256 of a file, hashed once: the digest is remembered under `root`/hashes (default: the
    cache root) with the file's size, mtime, ctime and inode, and reused while they are unchanged.
    A memo that cannot be read or written is ignored (the file is hashed again next time)."""
    path = Path(path).resolve()
    known = remembered_hash(path, root)
    if known is not None:
        return known
    signature = file_signature(path)
    digest = hash_file(path)
    remember_hash(path, digest, signature, root)
    return digest


def remember_hash(path: Path, digest: str, signature: list[int], root: Path | None = None) -> None:
    """Remember `digest` as the sha256 of `path` while it keeps `signature` (file_signature taken
    before the bytes were hashed, e.g. under another name before a rename); nothing if it changed."""
    path = Path(path).resolve()
    try:
        if file_signature(path) == signature:
            with atomic_path(_memo_path(path, root)) as tmp:
                tmp.write_text(json.dumps({"path": str(path), "stat": signature, "sha256": digest}))
    except OSError:
        pass


# -- what the cache holds (`sdcn-trt cache`) -----------------------------------------------------------------
UNFINISHED_AFTER_S = 6 * 3600  # a temporary this old is a write that stopped, not one in progress
# top-level folder -> the kind of entry each of its children is
CACHE_KINDS = {"weights": "weights", "onnx": "onnx", "engines": "tensorrt", "inductor": "inductor",
               "torch_compile": "torch.compile", "references": "references", "hashes": "file hashes",
               "clip_tokenizer": "tokenizer"}


@dataclass(frozen=True)
class CacheEntry:
    """One entry of the cache: a folder or file under a kind's folder, its size, what it was made for and,
    when this install can never use it, why (`stale`)."""

    kind: str
    path: Path
    bytes: int
    made_for: str = ""  # e.g. "torch 2.11.0, NVIDIA H200" (from the entry's own key or meta.json)
    stale: str = ""  # why this install cannot use it; "" when it can (or may)


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _judge(kind: str, path: Path, torch_version: str, python: str) -> tuple[str, str]:
    """(made for, stale reason) of one entry, from the key or meta.json it carries."""
    if path.name.startswith("."):  # a temporary of a write: in progress in another process, or abandoned
        if path.name == ".unpack" or time.time() - path.lstat().st_mtime < UNFINISHED_AFTER_S:
            return "", ""
        return "", f"an unfinished write (a temporary untouched for over {UNFINISHED_AFTER_S // 3600} h)"
    if kind == "torch.compile":
        key = _json(path / "key.json")
        device = key.get("device", {})
        made = f"torch {key.get('torch')}, Python {key.get('python')}, " + (
            f"{device.get('name')} (sm{''.join(map(str, device.get('capability', [])))})"
            if device.get("type") == "cuda" else f"{device.get('type', '?')} {device.get('model', '')}".strip())
        if not key:
            return "", "no key.json: not a folder this package wrote"
        if key.get("torch") != torch_version or key.get("python") != python:
            return made, f"made by torch {key.get('torch')} / Python {key.get('python')}, this is torch {torch_version} / Python {python}"
        return made, ""
    if kind == "inductor":
        parts = _json(path / "meta.json").get("parts", {})
        device = parts.get("device", {})
        made = f"torch {parts.get('torch')}, {device.get('name') or device.get('type', '?')}"
        if not parts:
            return "", "no readable meta.json: a package that cannot be checked is never loaded"
        if parts.get("torch") != torch_version:
            return made, f"compiled by torch {parts.get('torch')}, this is torch {torch_version}"
        return made, ""
    if kind == "tensorrt":
        platform = _json(path / "meta.json").get("platform", {}) if path.is_dir() else {}
        return (f"TensorRT {platform.get('trt_version')}, {platform.get('gpu_name')}" if platform else ""), ""
    if kind == "file hashes":
        record = _json(path)
        target = Path(record.get("path", ""))
        if not record or not target.exists():
            return str(target), "the file it remembers is gone"
        return str(target), "" if file_signature(target) == record.get("stat") else "the file it remembers has changed"
    return "", ""


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry under the cache root (`root`, else $SDCN_TRT_CACHE), kind by kind, with its size and, for
    the kinds that say what made them, whether this install can still use it."""
    import sys

    root = Path(root) if root is not None else cache_root()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    entries = []
    for folder, kind in CACHE_KINDS.items():
        base = root / folder
        if not base.is_dir():
            continue
        children = [base] if kind == "tokenizer" else sorted(base.iterdir())
        for path in children:
            made, stale = _judge(kind, path, torch.__version__, python)
            entries.append(CacheEntry(kind, path, _size(path), made, stale))
    return entries


def remove_cache_entries(entries: list[CacheEntry], root: Path | None = None) -> int:
    """Remove these entries (a link is removed, never followed); an entry not inside the cache root is refused
    before anything is removed. Returns the bytes freed."""
    import shutil

    root = (Path(root) if root is not None else cache_root()).resolve()
    for entry in entries:
        parent = entry.path.parent.resolve()  # the entry itself may be a link: where it points does not count
        if parent != root and root not in parent.parents:
            raise InputError(f"{entry.path} is not inside the cache {root}; nothing was removed")
    freed = 0
    for entry in entries:
        if entry.path.is_symlink() or not entry.path.is_dir():
            entry.path.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry.path)
        freed += entry.bytes
    return freed
