"""Weights on disk and in modules: what a checkpoint file is, memory-mapped reads, streamed
safetensors writes, and modules built without initialising, then filled by assignment."""
from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from sdcn_trt.errors import WeightsError

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; Python's mmap may not name it
_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
          "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")
_MAGIC = [  # (leading bytes, what a file starting with them is)
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"), (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ", "an xz archive"), (b"7z\xbc\xaf", "a 7-zip archive"), (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF", "an HDF5 file (Keras/TensorFlow weights?)"), (b"RIFF", "a RIFF (WebP/WAV) file"),
]


# ---------------------------------------------------------------------------------------------
# What a file is
# ---------------------------------------------------------------------------------------------
def sniff(path: Path) -> tuple[str, str]:
    """(kind, description): kind is "torch-zip" or "safetensors" for files this package reads,
    else "other", with a description of what the file looks like."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "other", "an empty file"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "other", "a truncated or damaged zip archive (an interrupted download?)"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip", "a PyTorch zip checkpoint"
        return "other", f"a zip archive that is not a PyTorch checkpoint (it holds {', '.join(names[:3])}...)"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "other", ("an old-style PyTorch pickle (saved without the zip format, before torch 1.6) or a plain "
                         "pickle, which cannot be memory-mapped or loaded safely: load it once with torch.load "
                         "and save it again with torch.save, or convert it to .safetensors")
    if len(head) >= 10 and head[8:10] in (b'{"', b"{ ", b"{'"):
        header_len = struct.unpack("<Q", head[:8])[0]
        if 8 + header_len > size:
            return "other", "a truncated safetensors file (its header runs past the end)"
        return "safetensors", "a safetensors file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return "other", what
    try:
        text = head.decode("utf-8", errors="strict" if len(head) < 4096 else "ignore")  # a cut last character
    except UnicodeDecodeError:
        text = ""
    if not text or any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return "other", f"unrecognised binary data (first bytes {head[:8].hex(' ')})"
    lowered = text.lstrip().lower()
    if lowered.startswith("version https://git-lfs"):
        return "other", "a Git LFS pointer file, not the weights (run `git lfs pull` where it came from)"
    if lowered.startswith(("<!doctype html", "<html")):
        return "other", "an HTML page (a download that saved a web page instead of the file?)"
    return "other", "a text file"


def not_a_checkpoint(path: Path, description: str) -> WeightsError:
    return WeightsError(f"not a PyTorch checkpoint or safetensors file: {path} (looks like: {description}); "
                        "expected a zip-format torch.save file (.pth/.ckpt) or a .safetensors file")


def read_tensors(path: Path) -> dict[str, Any]:
    """The object a checkpoint holds, memory-mapped: tensors are read from disk when first used.
    Zip-format torch files load with weights_only=True; anything else is refused, named."""
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    kind, description = sniff(path)
    if kind == "other":
        raise not_a_checkpoint(path, description)
    try:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
                return {k: f.get_tensor(k) for k in f.keys()}
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch/safetensors raise many types for corrupt or unsafe files
        raise WeightsError(f"cannot read checkpoint {path} ({description}): {exc}") from exc


# ---------------------------------------------------------------------------------------------
# safetensors, written one tensor at a time
# ---------------------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (each cast to `dtypes[name]`) as a safetensors file, one at a time: no second
    copy of the whole set is made. Wider dtypes come first, so every tensor's offset is aligned
    to its element size; the header is padded so that the data starts 64-byte aligned."""
    names = sorted(tensors, key=lambda n: (-torch.empty((), dtype=dtypes[n]).element_size(), n))
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in names:
        dtype = dtypes[name]
        nbytes = tensors[name].numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            t = tensors[name].detach().to(dtypes[name]).contiguous().reshape(-1)
            if t.numel():
                f.write(t.view(torch.uint8).numpy().data)


def map_safetensors(path: Path, prefix: str = "", populate: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file written by `write_safetensors` whose names start with
    `prefix` (dropped from the names): views of one private, copy-on-write memory map of the file.
    `populate` maps their pages in at once (one madvise call instead of a fault per page)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        size = os.fstat(f.fileno()).st_size
        mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = 8 + header_len
    picked = {k: v for k, v in header.items() if k != "__metadata__" and k.startswith(prefix)}
    if populate and picked:
        start = base + min(v["data_offsets"][0] for v in picked.values())
        start -= start % mmap.PAGESIZE
        end = base + max(v["data_offsets"][1] for v in picked.values())
        with contextlib.suppress(OSError, ValueError):  # kernels before 5.14: pages fault in when used
            mapped.madvise(MADV_POPULATE_READ, start, end - start)
    data = torch.frombuffer(mapped, dtype=torch.uint8)  # (file size,) bytes; keeps the map alive
    dtypes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    out = {}
    for name, info in picked.items():
        begin, stop = info["data_offsets"]
        out[name[len(prefix):]] = data[base + begin: base + stop].view(dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def sample_digest(path: Path, samples: int = 32, block: int = 1 << 16) -> str:
    """sha256 of the file's size, header and `samples` blocks spread over it: a cheap check that a
    large file is the one that was written (truncation, overwrites, a file put in its place)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        digest.update(f.read(min(header_len, size)))
        for i in range(samples + 1):
            f.seek(min(size - 1, i * max(1, (size - block) // samples)) if size else 0)
            digest.update(f.read(block))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Modules without initialisation, filled by assignment
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def empty_init() -> Iterator[None]:
    """Parameters created inside are put on the meta device as they are registered: no memory and
    no initialisation work. Buffers stay real (non-persistent ones, like CLIP's position ids, are
    computed and never loaded). Fill the module with `assign_weights`."""
    register = nn.Module.register_parameter
    inits = {name: getattr(nn.init, name) for name in _INITS if hasattr(nn.init, name)}

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    def skipping(init: Any) -> Any:  # initialising a meta tensor does nothing, slowly: skip it
        return lambda tensor, *args, **kwargs: tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    for name, init in inits.items():
        setattr(nn.init, name, skipping(init))
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
        for name, init in inits.items():
            setattr(nn.init, name, init)


def check_weights(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, source: Path | str) -> None:
    """WeightsError naming the missing, unexpected and mis-shaped keys when `state` does not fit `module`."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        parts = [f"{len(missing)} missing: {head(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {head(unexpected)}" if unexpected else "",
                 f"{len(shapes)} with other shapes: {head(shapes)}" if shapes else ""]
        raise WeightsError(f"{what} weights in {source} do not match the config; " + "; ".join(p for p in parts if p))


def assign_weights(module: nn.Module, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> nn.Module:
    """Make `state`'s tensors the module's weights (no copy unless `dtype` asks for a cast)."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)
