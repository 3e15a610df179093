"""Which ONNX initializer holds which torch parameter: the map that lets an exported graph run other weights.

The TorchScript exporter names a parameter's initializer after the parameter, but constant folding
and onnxslim rewrite some of them: Linear weights become transposed `onnx::MatMul_*` tensors,
GroupNorm weights reshaped (C, 1, 1) ones, identical tensors are merged, `x + 0` and `x * 1` are
removed. So the map is found by content at export time: an initializer holds parameter p when its
bytes equal p's (same shape, or reshaped) or p transposed's. A tensor whose elements are all equal
(fresh norm weights, zero biases) says nothing about where it came from; such parameters, and any
parameter found in no initializer (folded into a constant, or unused), are *pinned*: the graph can
take other weights only while those stay as they were. `plan_swap` applies these rules.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from sdcn_trt.cache import hash_json

MAP_FORMAT = 1
# config entries that describe a file, not the network (save_pretrained fills some of them in)
_CONFIG_METADATA = {"transformers_version", "architectures", "dtype", "torch_dtype", "name_or_path"}
SHOWN = 3  # names listed in a reason


def _digest(data: Any) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()[:32]


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (dtype-specific), shortened."""
    t = tensor.detach().cpu().contiguous()
    return _digest(t.view(torch.uint8).numpy()) if t.numel() else "empty"


def _constant_valued(array: np.ndarray) -> bool:
    flat = array.reshape(-1)
    return flat.size < 2 or bool((flat == flat[0]).all())


def graph_key(descriptor: Any, settings: Any) -> str:
    """What fixes an export's graph apart from weight values: network, export settings, tensor names,
    parameter names/shapes/dtypes, the model configs and the exporter. (Weight values still shape
    the graph through onnxslim; the weight map's pinned parameters cover that.)"""
    module = descriptor.build_module()
    signature = [(k, str(v.dtype), tuple(v.shape)) for k, v in module.state_dict().items()]
    configs = {}
    for name, net in descriptor.components.modules().items():
        config = net.config.to_dict() if hasattr(net.config, "to_dict") else dict(net.config)
        configs[name] = {k: v for k, v in config.items() if not k.startswith("_") and k not in _CONFIG_METADATA}
    return hash_json({"network": descriptor.name, "settings": asdict(settings.for_network(descriptor)),
                      "io": [descriptor.input_names, descriptor.output_names], "params": signature,
                      "configs": configs, "torch": torch.__version__, "map": MAP_FORMAT})


def iter_initializers(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every initializer of an ONNX file; external data is memory-mapped, so a
    multi-GB model streams through without being held in memory."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        shape = tuple(tensor.dims)
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            count = int(np.prod(shape, dtype=np.int64))
            array = np.memmap(path.parent / info["location"], dtype=dtype, mode="r",
                              offset=int(info.get("offset", 0)), shape=(count,)).reshape(shape)
        else:
            array = numpy_helper.to_array(tensor)
        yield tensor.name, array


@dataclass
class InitializerSource:
    """Where one initializer's value comes from: parameters (all equal at export), a transform, a dtype."""

    params: list[str]
    transform: str  # "identity", "reshape" (same bytes, the initializer's shape) or "transpose" (2-D)
    dtype: str  # numpy dtype name of the initializer
    shape: list[int]


@dataclass
class WeightMap:
    """Recorded with an export: initializer -> parameters, and every parameter's digest at export time."""

    initializers: dict[str, InitializerSource] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # parameter -> digest of its torch (source) value

    @property
    def pinned(self) -> set[str]:
        located = {p for source in self.initializers.values() for p in source.params}
        return set(self.params) - located

    def to_json(self) -> dict[str, Any]:
        return {"format": MAP_FORMAT, "initializers": {k: asdict(v) for k, v in self.initializers.items()},
                "params": self.params}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "WeightMap | None":
        if not isinstance(data, dict) or data.get("format") != MAP_FORMAT:
            return None
        return cls({k: InitializerSource(**v) for k, v in data["initializers"].items()}, dict(data["params"]))


def build_weight_map(onnx_path: Path, exported: torch.nn.Module, source: torch.nn.Module) -> WeightMap:
    """The map of an export: `exported` is the module as exported (fp16 for fp16 files), `source` the
    fp32 module whose parameters later runs compare against (the same module for fp32 files)."""
    candidates: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (digest, dtype) -> [(param, transform)]
    for name, tensor in exported.state_dict().items():
        array = tensor.detach().cpu().contiguous().numpy()
        if not np.issubdtype(array.dtype, np.floating) or _constant_valued(array):
            continue
        candidates.setdefault((_digest(array), array.dtype.name), []).append((name, "direct"))
        if array.ndim == 2:
            candidates.setdefault((_digest(np.ascontiguousarray(array.T)), array.dtype.name), []).append(
                (name, "transpose"))
    shapes = {k: tuple(v.shape) for k, v in exported.state_dict().items()}
    if exported is source:  # fp32: the digests of the exported tensors are the source's
        found_digests = {params[0][0]: digest for (digest, _), params in candidates.items() if params[0][1] == "direct"}
        digests = {k: found_digests.get(k) or tensor_digest(v) for k, v in source.state_dict().items()}
    else:
        digests = {k: tensor_digest(v) for k, v in source.state_dict().items()}
    weight_map = WeightMap(params=digests)
    for name, array in iter_initializers(onnx_path):
        if not np.issubdtype(array.dtype, np.floating) or _constant_valued(array):
            continue  # a constant of the graph, or a tensor whose content names no parameter
        found = candidates.get((_digest(np.ascontiguousarray(array)), array.dtype.name), [])
        if not found:
            continue
        transform = found[0][1]
        params = [p for p, t in found if t == transform]
        if transform == "direct":
            transform = "identity" if shapes[params[0]] == array.shape else "reshape"
        weight_map.initializers[name] = InitializerSource(params, transform, array.dtype.name, list(array.shape))
    return weight_map


@dataclass
class SwapPlan:
    """New values for the initializers whose parameters changed, or why the graph cannot take them."""

    values: dict[str, np.ndarray]  # initializer -> value in the file's dtype and shape
    changed: list[str]  # parameters that differ from the export's
    reason: str = ""  # non-empty: not swappable; re-export

    @property
    def swappable(self) -> bool:
        return not self.reason


def _value(source: InitializerSource, tensor: torch.Tensor) -> np.ndarray:
    """The initializer's value from a parameter: cast like the exporter (`module.to(dtype)`), transformed."""
    array = tensor.detach().cpu().to(getattr(torch, np.dtype(source.dtype).name)).numpy()
    if source.transform == "transpose":
        array = array.T
    return np.ascontiguousarray(array).reshape(source.shape)


def plan_swap(weight_map: WeightMap, state: dict[str, torch.Tensor], everything: bool = False) -> SwapPlan:
    """The initializers to replace so that the export computes with `state` (the network module's
    state_dict, fp32): those of changed parameters (`everything`: all of them, e.g. to fill a
    TensorRT refit). Not swappable when the parameter set differs, a pinned parameter changed,
    or parameters that share one initializer no longer agree."""
    if set(state) != set(weight_map.params):
        extra, missing = sorted(set(state) - set(weight_map.params)), sorted(set(weight_map.params) - set(state))
        return SwapPlan({}, [], f"the network's parameters differ from the export's (new: {extra[:SHOWN]}, "
                                f"gone: {missing[:SHOWN]})")
    changed = [k for k, v in state.items() if tensor_digest(v) != weight_map.params[k]]
    pinned = sorted(weight_map.pinned.intersection(changed))
    if pinned:
        return SwapPlan({}, changed, f"{len(pinned)} changed parameters are not stored as initializers of the export "
                                     f"(folded into constants, removed as constant-valued, or unused): "
                                     f"{', '.join(pinned[:SHOWN])}")
    changed_set, values = set(changed), {}
    for name, source in weight_map.initializers.items():
        if not everything and changed_set.isdisjoint(source.params):
            continue
        first = state[source.params[0]]
        if any(not torch.equal(state[p], first) for p in source.params[1:]):
            return SwapPlan({}, changed, f"initializer {name} stands for parameters {source.params[:SHOWN]}, "
                                         f"which were equal at export and now differ")
        values[name] = _value(source, first)
    return SwapPlan(values, changed)
