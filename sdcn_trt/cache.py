"""The on-disk cache: where it lives, content hashes for keys, and atomic file writes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

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
