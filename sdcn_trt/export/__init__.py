"""ONNX export: one descriptor per network, exported, checked against torch and cached."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from sdcn_trt.cache import cache_root
from sdcn_trt.models.components import Components
from sdcn_trt.export.descriptors import DESCRIPTORS, ShapeRange, ShapeSpec, get_descriptor
from sdcn_trt.export.onnx_export import ExportResult, ExportSettings, export_onnx

__all__ = ["DESCRIPTORS", "ExportResult", "ExportSettings", "ShapeRange", "ShapeSpec", "export_networks",
           "get_descriptor"]


def export_networks(components: Components, names: Sequence[str] | None = None,
                    settings: ExportSettings = ExportSettings(), cache_dir: str | Path | None = None,
                    output_dir: str | Path | None = None) -> dict[str, ExportResult]:
    """Export (or reuse from the cache) each named network; optionally copy them to `output_dir`
    as <name>.onnx (+ <name>.onnx.data when external). Unknown names fail before any work."""
    descriptors = [get_descriptor(n, components) for n in (names or list(DESCRIPTORS))]
    cache = Path(cache_dir) if cache_dir else cache_root()
    results = {}
    for desc in descriptors:
        result = export_onnx(desc, cache, settings)
        if output_dir is not None:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            target = out / f"{desc.name}.onnx"
            shutil.copyfile(result.path, target)
            data = result.path.with_name(result.path.name + ".data")
            if data.exists():  # the .onnx refers to its data file by name: keep that name beside it
                shutil.copyfile(data, out / data.name)
            result = ExportResult(target, result.key, result.cached, result.check, result.seconds)
        results[desc.name] = result
    return results
