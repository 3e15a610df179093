"""TensorRT refit: an engine built with BuilderFlag.REFIT takes new weights (a LoRA at some strength,
another ControlNet of the same architecture) in seconds instead of an export and a rebuild.

TensorRT's ONNX parser names an engine's refittable weights after the ONNX initializers, so the
refit plan is the onnxruntime swap plan (export/weight_map.py): initializer name -> value, in the
ONNX file's dtype and shape. Everything here but `refit_engine` is plain code tested on the CPU;
`refit_engine` is written for TensorRT 10/11 and type-checked against tensorrt-stubs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch

from sdcn_trt.errors import SdcnError
from sdcn_trt.export.weight_map import WeightMap, plan_swap

if TYPE_CHECKING:
    import tensorrt as trt

logger = logging.getLogger(__name__)

SHOWN = 3


class RefitError(SdcnError, RuntimeError):
    """TensorRT refused new weights for an engine; the message names the weights."""


@dataclass
class RefitPlan:
    """The weights to set on a refittable engine, or why it must be rebuilt instead."""

    weights: dict[str, np.ndarray] = field(default_factory=dict)  # initializer name -> value (ONNX dtype/shape)
    reason: str = ""  # non-empty: rebuild

    @property
    def refittable(self) -> bool:
        return not self.reason


def refit_plan(weight_map: WeightMap | None, state: dict[str, torch.Tensor], refittable: Iterable[str]) -> RefitPlan:
    """What to set so that an engine built from the mapped export computes with `state` (the network
    module's state_dict): the initializers of changed parameters, each one a refittable weight."""
    if weight_map is None:
        return RefitPlan(reason="the engine records no weight map (built before refit support)")
    plan = plan_swap(weight_map, state)
    if not plan.swappable:
        return RefitPlan(reason=plan.reason)
    available = set(refittable)
    unknown = sorted(set(plan.values) - available)
    if unknown:
        return RefitPlan(reason=f"{len(unknown)} changed initializers are not refittable weights of the engine "
                                f"(TensorRT folded them into other constants): {', '.join(unknown[:SHOWN])}; "
                                f"the engine has {len(available)} refittable weights")
    return RefitPlan(plan.values)


def check_prototypes(weights: dict[str, np.ndarray], prototypes: dict[str, tuple[str, int]]) -> None:
    """RefitError unless every value has the dtype and element count of the engine's weight
    (`prototypes`: name -> (numpy dtype name, count), from Refitter.get_weights_prototype)."""
    bad = [f"{name}: {array.dtype.name} x {array.size}, engine expects {prototypes[name][0]} x {prototypes[name][1]}"
           for name, array in weights.items()
           if name in prototypes and (array.dtype.name, array.size) != prototypes[name]]
    if bad:
        raise RefitError(f"{len(bad)} weights do not fit the engine: {'; '.join(bad[:SHOWN])}")


def fill_missing(missing: list[str], weight_map: WeightMap, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Values for the weights TensorRT wants set along with the changed ones (get_missing_weights:
    weights it fused with them); RefitError for a name the map does not know (an unnamed or
    folded weight)."""
    everything = plan_swap(weight_map, state, everything=True)
    unknown = [name or "(unnamed)" for name in missing if name not in everything.values]
    if unknown:
        raise RefitError(f"TensorRT asks for weights the ONNX weight map cannot supply: {', '.join(unknown[:SHOWN])}"
                         f"{' ...' if len(unknown) > SHOWN else ''}; rebuild the engine (BuildSettings.refit=False)")
    return {name: everything.values[name] for name in missing}


def _numpy_dtype(dtype: trt.DataType) -> str:
    import tensorrt as trt

    return {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16",
            trt.DataType.INT32: "int32", trt.DataType.INT64: "int64", trt.DataType.INT8: "int8"}.get(dtype, str(dtype))


def refit_engine(engine: trt.ICudaEngine, weights: dict[str, np.ndarray],
                 complete: Callable[[list[str]], dict[str, np.ndarray]], trt_logger: trt.ILogger) -> int:
    """Set `weights` on a refittable engine (and whatever `complete` supplies for the weights TensorRT
    says are missing), then refit it in place. Returns the number of weights set."""
    import tensorrt as trt

    refitter = trt.Refitter(engine, trt_logger)
    prototypes = {}
    for name in weights:
        proto = refitter.get_weights_prototype(name)
        prototypes[name] = (_numpy_dtype(proto.dtype), int(proto.size))
    check_prototypes(weights, prototypes)
    kept = []  # trt.Weights borrows the array's memory until the refit ends
    for name, array in weights.items():
        kept.append(np.ascontiguousarray(array))
        if not refitter.set_named_weights(name, trt.Weights(kept[-1])):
            raise RefitError(f"TensorRT refused weights {name!r} ({array.dtype.name}, shape {array.shape})")
    missing = [str(n) for n in refitter.get_missing_weights()]
    extra = complete(missing) if missing else {}
    for name, array in extra.items():
        kept.append(np.ascontiguousarray(array))
        if not refitter.set_named_weights(name, trt.Weights(kept[-1])):
            raise RefitError(f"TensorRT refused weights {name!r} ({array.dtype.name}, shape {array.shape})")
    if not refitter.refit_cuda_engine():
        raise RefitError(f"TensorRT could not refit the engine with {len(weights) + len(extra)} weights "
                         f"(missing: {[str(n) for n in refitter.get_missing_weights()][:SHOWN]}); see its log")
    logger.info("refitted %d weights (%d changed, %d that TensorRT fused with them)", len(weights) + len(extra),
                len(weights), len(extra))
    return len(weights) + len(extra)


def refit_to_weights(engine: trt.ICudaEngine, weight_map: WeightMap | None, state: dict[str, torch.Tensor],
                     trt_logger: trt.ILogger) -> str:
    """Refit `engine` (built from the export `weight_map` describes) so that it computes with `state`.
    Returns why it cannot be (rebuild instead), or "" when it now holds these weights."""
    import tensorrt as trt

    names = [str(n) for n in trt.Refitter(engine, trt_logger).get_all_weights()]
    plan = refit_plan(weight_map, state, names)
    if not plan.refittable:
        return plan.reason
    if not plan.weights:
        return ""
    assert weight_map is not None
    try:
        refit_engine(engine, plan.weights, lambda missing: fill_missing(missing, weight_map, state), trt_logger)
    except RefitError as exc:
        return str(exc)
    return ""
