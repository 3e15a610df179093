"""torch -> ONNX for any descriptor: export, clean up, check against torch, cache by content hash."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdcn_trt.cache import atomic_path, file_signature, hash_file, hash_file_cached, hash_json, remember_hash
from sdcn_trt.config import PRECISIONS, check_choice
from sdcn_trt.errors import InputError
from sdcn_trt.export.descriptors import NetworkDescriptor, ShapeSpec
from sdcn_trt.export.weight_map import build_weight_map, graph_key

logger = logging.getLogger(__name__)

MAX_OPSET = 20  # GroupNormalization-21 broke in TensorRT 10.7
EXTERNAL_DATA_BYTES = 2**31 - 2**24  # protobuf's 2 GB limit, with headroom
META_FILE = "meta.json"


@dataclass(frozen=True)
class ExportSettings:
    """How a network is exported; every field is part of the cache key."""

    precision: str = "fp32"  # "fp32", or "fp16" (fp16 weights and I/O: TensorRT 11's strongly typed networks)
    opset: int = 17
    sample: ShapeSpec = field(default_factory=ShapeSpec)  # tracing shape: the contest's
    dynamic: bool = True  # symbolic batch / height / width axes
    simplify: bool = True  # onnxslim: constant folding, shape inference, dead-node removal

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        if not 13 <= self.opset <= MAX_OPSET:
            raise InputError(f"opset must be in 13..{MAX_OPSET}, got {self.opset}")

    def for_network(self, descriptor: NetworkDescriptor) -> "ExportSettings":
        """These settings with the precision the network runs in (fp32-only networks stay fp32)."""
        return dataclasses.replace(self, precision=descriptor.precision_for(self.precision))


@dataclass
class ExportResult:
    path: Path  # the .onnx file (its external data, if any, sits beside it)
    key: str
    cached: bool  # True when nothing was exported this time
    check: dict[str, dict[str, float]]  # per output: max_abs, max_rel, mean_abs vs torch fp32
    seconds: float


def export_key(descriptor: NetworkDescriptor, settings: ExportSettings) -> str:
    """Key of the model's weights (a content key of their source: nothing is read), the network,
    the export settings and the exporter's version."""
    weights = descriptor.components.weights_id(settings.precision)
    return hash_json({"network": descriptor.name, "weights": weights, "settings": asdict(settings),
                      "io": [descriptor.input_names, descriptor.output_names], "torch": torch.__version__,
                      "format": 2})


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _torch_outputs(module: torch.nn.Module, feed: dict[str, torch.Tensor], names: list[str]) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = module(*feed.values())
    out = out if isinstance(out, (tuple, list)) else (out,)
    return {n: o.float().numpy() for n, o in zip(names, out, strict=True)}


def run_onnx(path: Path, feed: dict[str, torch.Tensor], light: bool = False) -> dict[str, np.ndarray]:
    """Run an exported file on onnxruntime's CPU provider, casting inputs to the file's dtypes.
    `light`: basic graph optimisations only (a large model's full optimisation copies its weights)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if light:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}
    inputs = {i.name: feed[i.name].numpy().astype(dtypes[i.type]) for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return {n: v.astype(np.float32) for n, v in zip(names, session.run(names, inputs), strict=True)}


def compare_outputs(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """max |a - e|, max |a - e| / max |e|, mean |a - e| for every output."""
    report = {}
    for name, e in expected.items():
        d = np.abs(actual[name].astype(np.float64) - e)
        report[name] = {"max_abs": float(d.max()), "max_rel": float(d.max() / max(np.abs(e).max(), 1e-12)),
                        "mean_abs": float(d.mean()), "nonfinite": int((~np.isfinite(actual[name])).sum())}
    return report


def _valid_cache(folder: Path, key: str, model_file: str) -> dict | None:
    """The cache entry's metadata when it is complete and its files match their recorded hashes."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("key") != key or model_file not in meta["files"]:
            return None
        for name, digest in meta["files"].items():
            if hash_file_cached(folder / name, folder.parent.parent) != digest:  # hashed once, then by stat
                logger.warning("cached ONNX file %s is corrupt (hash mismatch); re-exporting", folder / name)
                return None
        return meta
    except (OSError, ValueError, KeyError):
        return None


def _consolidate_external_data(proto, source_dir: Path, target: Path) -> list[str]:  # proto: onnx.ModelProto
    """Move every external tensor into one <network>.onnx.data file, chunk by chunk, and save the
    graph beside it; returns the two file names."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    data_name = target.name + ".data"
    offset = 0
    with open(source_dir / data_name, "wb") as out:
        for tensor in proto.graph.initializer:
            if not uses_external_data(tensor):
                continue
            info = {e.key: e.value for e in tensor.external_data}
            length = int(info["length"]) if "length" in info else (source_dir / info["location"]).stat().st_size
            del tensor.external_data[:]
            with open(source_dir / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                if length < 1024:  # shape constants stay inline: shape inference must read them
                    tensor.raw_data = f.read(length)
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    continue
                for start in range(0, length, 1 << 24):
                    out.write(f.read(min(1 << 24, length - start)))
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            pad = -length % 4096  # keep tensors page-aligned, as onnx's own writer does
            out.write(b"\0" * pad)
            offset += length + pad
    onnx.save_model(proto, str(target))
    return [target.name, data_name]


def _write_model(model, target: Path) -> list[str]:  # model: onnx.ModelProto
    """Save to `target` (<network>.onnx), with all weights in one external file <network>.onnx.data
    when the model exceeds protobuf's 2 GB limit."""
    import onnx

    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        data = target.name + ".data"
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return [target.name, data]
    onnx.save_model(model, str(target))
    return [target.name]


def export_onnx(descriptor: NetworkDescriptor, cache_dir: Path, settings: ExportSettings = ExportSettings(),
                check: bool = True) -> ExportResult:
    """Export `descriptor`'s network (or reuse a valid cached export) and check it against torch.

    The entry is written in a temporary folder and renamed into place complete, with meta.json
    recording file hashes: a crash leaves nothing that looks finished, and a corrupt or stale
    file is detected and rebuilt.
    """
    import onnx
    from onnx.external_data_helper import uses_external_data

    settings = settings.for_network(descriptor)
    key = export_key(descriptor, settings)
    folder = Path(cache_dir) / "onnx" / f"{descriptor.name}-{settings.precision}-{key[:16]}"
    model_file = f"{descriptor.name}.onnx"
    meta = _valid_cache(folder, key, model_file)
    if meta is not None:
        return ExportResult(folder / model_file, key, True, meta["check"], 0.0)
    clock = time.perf_counter()
    logger.debug("exporting %s (%s): no valid cached ONNX under %s", descriptor.name, settings.precision, folder)
    source = module = descriptor.build_module()
    feed = descriptor.sample_inputs(settings.sample)
    held = _dtype(module)  # fp16 when the components hold fp16 weights
    reference = module if held == torch.float32 else copy.deepcopy(module).float()
    expected = _torch_outputs(reference, feed, descriptor.output_names) if check else {}
    del reference
    dtype = torch.float16 if settings.precision == "fp16" else torch.float32
    if dtype != held:
        module = copy.deepcopy(module).to(dtype)  # the shared components stay as they are for everyone else
    args = tuple(v.to(dtype) if v.is_floating_point() else v for v in feed.values())
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        raw = work / "raw.onnx"
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(module, args, str(raw), input_names=descriptor.input_names,
                              output_names=descriptor.output_names, opset_version=settings.opset,
                              dynamic_axes=descriptor.dynamic_axes() if settings.dynamic else None,
                              do_constant_folding=True, dynamo=False)
        proto = onnx.load(str(raw), load_external_data=False)
        large = any(uses_external_data(t) for t in proto.graph.initializer)
        if large:
            # over protobuf's 2 GB: stream the exporter's one-file-per-tensor data into one file;
            # holding the weights in memory again to slim them would not fit a 24 GiB machine
            files = _consolidate_external_data(proto, work, work / model_file)
        else:
            model = onnx.load(str(raw), load_external_data=True)
            if settings.simplify:
                import onnxslim

                model = onnxslim.slim(model)
            files = _write_model(model, work / model_file)
            del model
        for stale in work.iterdir():
            if stale.name not in files:
                stale.unlink()
        report = compare_outputs(expected, run_onnx(work / model_file, feed, light=large)) if check else {}
        signatures = {name: file_signature(work / name) for name in files}
        meta = {"key": key, "network": descriptor.name, "settings": asdict(settings), "check": report,
                "simplified": settings.simplify and not large,
                "files": {name: hash_file(work / name) for name in files}, "inputs": descriptor.input_names,
                "outputs": descriptor.output_names, "graph": graph_key(descriptor, settings),
                "weights": build_weight_map(work / model_file, module, source).to_json()}  # see export/weights.py
        with atomic_path(work / META_FILE) as tmp:
            tmp.write_text(json.dumps(meta, indent=1, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
        for name in files:  # the next validation need not hash them again
            remember_hash(folder / name, meta["files"][name], signatures[name], folder.parent.parent)
    finally:
        if work.exists():
            shutil.rmtree(work)
    seconds = time.perf_counter() - clock
    logger.info("exported %s (%s) to %s in %.1f s", descriptor.name, settings.precision, folder, seconds)
    return ExportResult(folder / model_file, key, False, report, seconds)
