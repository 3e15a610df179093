"""Weights on disk and in modules: what a checkpoint file is, memory-mapped reads, streamed
safetensors writes, and modules built without initialising, then filled by assignment."""
from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import pickle
import pickletools
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
                         "pickle, which cannot be memory-mapped or loaded safely; if it comes from a source you "
                         "trust, convert it to .safetensors where you trust it")
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


def missing_checkpoint(path: Path) -> WeightsError:
    """The error for a checkpoint path with no file: not found, or a folder where the file should be."""
    if path.is_dir():
        return WeightsError(f"checkpoint file {path} is a folder; give the .pth/.ckpt/.safetensors file itself")
    return WeightsError(f"checkpoint file not found: {path}")


def not_a_checkpoint(path: Path, description: str) -> WeightsError:
    return WeightsError(f"not a PyTorch checkpoint or safetensors file: {path} (looks like: {description}); "
                        "expected a zip-format torch.save file (.pth/.ckpt) or a .safetensors file")


def read_tensors(path: Path) -> dict[str, Any]:
    """The object a checkpoint holds, memory-mapped: tensors are read from disk when first used.
    Zip-format torch files load with weights_only=True; anything else is refused, named."""
    if not path.is_file():
        raise missing_checkpoint(path)
    kind, description = sniff(path)
    if kind == "other":
        raise not_a_checkpoint(path, description)
    try:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
                return {k: f.get_tensor(k) for k in f.keys()}
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:  # weights-only unpickling refused something; nothing of it ran
        raise refused_pickle(path, description, str(exc)) from None  # not chained: torch's advice is unsafe
    except Exception as exc:  # torch/safetensors raise many types for corrupt or unsafe files
        raise WeightsError(f"cannot read checkpoint {path} ({description}): {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Pickles that hold more than tensors
# ---------------------------------------------------------------------------------------------
def pickle_globals(path: Path) -> list[tuple[str, str]]:
    """The globals (module, name) a zip-format torch file's pickle imports, in order, read from its
    opcodes without running any of them."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    found: list[tuple[str, str]] = []
    strings: list[str] = []  # string constants in push order (STACK_GLOBAL takes the last two)
    memo: dict[int, object] = {}
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name == "GLOBAL":  # protocol <= 3: arg is "module name"
            module, _, name = str(arg).partition(" ")
            found.append((module, name))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append((strings[-2], strings[-1]))
        elif isinstance(arg, str) and "UNICODE" in opcode.name:
            strings.append(arg)
        elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
            memo[int(arg)] = strings[-1]
        elif opcode.name == "MEMOIZE" and strings:
            memo[len(memo)] = strings[-1]
        elif opcode.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(int(arg)), str):
            strings.append(str(memo[int(arg)]))
    return list(dict.fromkeys(found))


def _allowed_globals() -> set[str]:
    """The globals torch's weights-only unpickler accepts (its own table plus those added by
    torch.serialization.add_safe_globals)."""
    from torch import _weights_only_unpickler as unpickler

    allowed = set(getattr(unpickler, "_get_allowed_globals", dict)())
    for item in torch.serialization.get_safe_globals():
        obj = item[0] if isinstance(item, tuple) else item
        allowed.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    return allowed


def refused_global(path: Path) -> tuple[str, str] | None:
    """The first global (module, name) in `path`'s pickle that weights-only loading refuses, or None."""
    try:
        names = pickle_globals(path)
    except (zipfile.BadZipFile, StopIteration, ValueError, OSError):
        return None
    allowed = _allowed_globals()
    return next((g for g in names if f"{g[0]}.{g[1]}" not in allowed and g[0].split(".")[0] != "torch"), None)


def convert_recipe(path: Path, module: str, attribute: str) -> str:
    """Two lines of Python that convert `path` to safetensors, allowing only the global module.attribute."""
    first = attribute.split(".")[0]  # a nested class (Outer.Inner) is imported through its outer class
    target = path.with_suffix(".safetensors")
    return (f"    import torch, safetensors.torch; from {module} import {first}\n"
            f"    with torch.serialization.safe_globals([{attribute}]): "
            f"sd = torch.load({str(path)!r}, map_location='cpu'); "
            f"sd = sd.get('state_dict', sd); safetensors.torch.save_file("
            f"{{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, {str(target)!r})")


def refused_pickle(path: Path, description: str, torch_message: str) -> WeightsError:
    """What was refused and the safe way on, in place of torch's advice to turn the check off."""
    refused = refused_global(path)
    if refused is None:  # not a global: a damaged pickle, or an opcode weights-only loading refuses
        reason = " ".join(line.strip() for line in torch_message.splitlines()
                          if line.strip() and "weights_only" not in line and "torch.load" not in line)
        return WeightsError(f"cannot read checkpoint {path} ({description}): weights-only unpickling refused it: "
                            f"{reason or 'no reason given'}")
    return WeightsError(
        f"refused checkpoint {path}: besides tensors it holds Python objects, and loading them could run code "
        f"(the first refused global: {refused[0]}.{refused[1]}). sdcn_trt loads weights only, and nothing in the "
        f"file was run. "
        f"If the file comes from a source you trust, convert it to safetensors where you trust it (allowing "
        f"each global this names, one at a time), then use the .safetensors file:\n{convert_recipe(path, *refused)}")


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
