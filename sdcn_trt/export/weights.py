"""New weights without re-export: run a cached export of the same graph with its initializers replaced.

A LoRA merged at some strength, or another ControlNet checkpoint of the same architecture, changes
the weights and so the export's cache key, but not the graph. `prepare_onnx` looks for a cached
export whose graph key matches and whose weight map can take the new weights (`plan_swap`), and
returns it with the replacement values; onnxruntime adds them with `SessionOptions.add_initializer`,
TensorRT refits with them. Only when no cached export can take the weights is the network exported.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdcn_trt.export.descriptors import NetworkDescriptor
from sdcn_trt.export.onnx_export import META_FILE, ExportResult, ExportSettings, _valid_cache, export_key, export_onnx
from sdcn_trt.export.weight_map import SwapPlan, WeightMap, graph_key, plan_swap

logger = logging.getLogger(__name__)


@dataclass
class PreparedOnnx:
    """An ONNX file to run and the initializer values to run it with (empty: the file's own)."""

    export: ExportResult
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    note: str = ""  # how this file was chosen, in words (logged)

    @property
    def swapped(self) -> bool:
        return bool(self.initializers)


def read_weight_map(onnx_path: Path) -> WeightMap | None:
    """The weight map recorded beside an exported file (None for exports made before maps existed)."""
    try:
        meta = json.loads((Path(onnx_path).parent / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return WeightMap.from_json(meta.get("weights"))


def _cached_entries(cache_dir: Path, descriptor: NetworkDescriptor, settings: ExportSettings) -> list[tuple[Path, dict]]:
    """(folder, meta) of every cached export of this network and precision, newest first."""
    entries = []
    for meta_path in (Path(cache_dir) / "onnx").glob(f"{descriptor.name}-{settings.precision}-*/{META_FILE}"):
        try:
            entries.append((meta_path.stat().st_mtime, meta_path.parent, json.loads(meta_path.read_text())))
        except (OSError, ValueError):
            continue
    return [(folder, meta) for _, folder, meta in sorted(entries, key=lambda e: e[0], reverse=True)]


def prepare_onnx(descriptor: NetworkDescriptor, cache_dir: Path, settings: ExportSettings = ExportSettings(),
                 swap: bool = True) -> PreparedOnnx:
    """The export of `descriptor`'s network with its current weights: the cached export when there is
    one; else (`swap`) a cached export of the same graph with the initializers that changed
    replaced; else a fresh export. Parameters the graph cannot take (see weight_map) force the export,
    and the reason is logged."""
    settings = settings.for_network(descriptor)
    model_file = f"{descriptor.name}.onnx"
    key = export_key(descriptor, settings)
    entries = _cached_entries(cache_dir, descriptor, settings)
    for folder, meta in entries:
        if meta.get("key") == key and (valid := _valid_cache(folder, key, model_file)) is not None:
            return PreparedOnnx(ExportResult(folder / model_file, key, True, valid["check"], 0.0),
                                note="the cached export of these weights")
    if not swap:
        return PreparedOnnx(export_onnx(descriptor, cache_dir, settings), note="exported (swapping is off)")
    graph = graph_key(descriptor, settings)
    reasons, state = [], None
    for folder, meta in entries:
        weight_map = WeightMap.from_json(meta.get("weights"))
        if meta.get("graph") != graph or weight_map is None:
            continue
        if _valid_cache(folder, meta["key"], model_file) is None:
            continue
        state = state if state is not None else descriptor.build_module().state_dict()
        plan: SwapPlan = plan_swap(weight_map, state)
        if not plan.swappable:
            reasons.append(f"{folder.name}: {plan.reason}")
            continue
        note = (f"{folder.name} with {len(plan.values)} initializers replaced "
                f"({len(plan.changed)} parameters changed), no export")
        logger.debug("%s: running %s", descriptor.name, note)
        return PreparedOnnx(ExportResult(folder / model_file, meta["key"], True, {}, 0.0), plan.values, note)
    if reasons:
        logger.info("%s: re-exporting; no cached export of this graph can take the new weights: %s",
                    descriptor.name, "; ".join(reasons))
    return PreparedOnnx(export_onnx(descriptor, cache_dir, settings), note="exported: " + ("; ".join(reasons) or
                                                                                          "no export of this graph"))


def ort_model(onnx_path: Path, values: dict[str, np.ndarray], options: Any) -> tuple[str | bytes, dict[str, Any]]:
    """What to give `onnxruntime.InferenceSession` so the export runs with `values` as initializers:
    its path when there are none; else the graph with inline initializers replaced, serialized, and
    external ones handed to `options.add_external_initializers` (`options` also learns the folder
    of the rest of the external data). Returns (model, OrtValues to keep alive with the session).

    `SessionOptions.add_initializer` would not do: it shares an initializer between sessions, and
    onnxruntime's optimizers (NCHWc filter reordering, Conv fusions) keep reading the file's values.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if not values:
        return str(onnx_path), {}
    proto = onnx.load(str(onnx_path), load_external_data=False)
    external: dict[str, Any] = {}
    for tensor in proto.graph.initializer:
        if tensor.name not in values:
            continue
        if uses_external_data(tensor):  # the OrtValue shares the array's memory
            external[tensor.name] = ort.OrtValue.ortvalue_from_numpy(values[tensor.name])
        else:
            tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    if external:
        options.add_external_initializers(list(external), list(external.values()))
    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                     str(Path(onnx_path).parent))
    return proto.SerializeToString(), external
