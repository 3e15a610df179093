"""The TensorRT backend: in-process engine builds through Polygraphy (TensorRT 10 and 11), the engine cache, the runner.

Written against the documented TensorRT 10/11 and Polygraphy Python APIs; the runner, which calls
TensorRT directly, is type-checked with tensorrt-stubs. It has not run on a GPU yet (see README).
Planning that needs no GPU lives in plan.py; the Polygraphy loaders are made without one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdcn_trt.cache import atomic_path
from sdcn_trt.config import BackendConfig
from sdcn_trt.engines.base import Runner
from sdcn_trt.engines.tensorrt.plan import BuildMode, BuildSettings, Platform, build_mode, engine_key, rebuild_reasons
from sdcn_trt.engines.tensorrt.refit import refit_to_weights
from sdcn_trt.engines.tensorrt.support import tensorrt_status
from sdcn_trt.errors import BackendUnavailableError, SdcnError
from sdcn_trt.export.descriptors import NetworkDescriptor, Shape, get_descriptor
from sdcn_trt.export.onnx_export import ExportSettings, export_key, export_onnx
from sdcn_trt.export.weight_map import WeightMap, graph_key
from sdcn_trt.export.weights import read_weight_map

if TYPE_CHECKING:  # mypy checks this module against tensorrt-stubs; at run time it is imported lazily
    import tensorrt as trt

logger = logging.getLogger(__name__)

ENGINE_FILE, META_FILE = "engine.plan", "meta.json"


class EngineBuildError(SdcnError, RuntimeError):
    """TensorRT could not parse the ONNX or build the engine; the message holds its errors."""


def require_tensorrt() -> None:
    """BackendUnavailableError saying what is missing (TensorRT, or a GPU) and how to get it."""
    ok, why = tensorrt_status()
    if not ok:
        raise BackendUnavailableError(why)


def torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool, trt.DataType.UINT8: torch.uint8}
    return table[dtype]


def current_platform(device: torch.device) -> Platform:
    import tensorrt as trt

    props = torch.cuda.get_device_properties(device)
    return Platform(trt_version=str(trt.__version__), gpu_name=props.name, compute_capability=(props.major, props.minor))


def route_polygraphy_logs() -> None:
    """Polygraphy prints to stdout; send its messages (and TensorRT's, which it relays) to Python
    logging under "Polygraphy" instead, without colours (and so without its hint to install them)."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False
    G_LOGGER.letter = False
    G_LOGGER.use_python_logging_system = True


def polygraphy_loaders(onnx_path: Path, profile: dict[str, tuple[Shape, Shape, Shape]], settings: BuildSettings,
                       mode: BuildMode, timing_cache: Path, memory_pool_limits: dict[Any, int] | None = None,
                       ) -> tuple[Any, Any]:
    """Polygraphy's loaders for one engine build, as NVIDIA's diffusion demo builds them: the ONNX
    parsed as a strongly typed network where TensorRT 11 needs it, and a builder config with one
    optimisation profile, the FP16 flag where TensorRT 10 needs it, the optimisation level and the
    timing cache. Loaders run only when called, so making them needs neither TensorRT nor a GPU.
    `memory_pool_limits` is keyed by trt.MemoryPoolType (the caller holds TensorRT)."""
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, Profile

    route_polygraphy_logs()
    shapes = Profile()
    for name, (lo, opt, hi) in profile.items():
        shapes.add(name, min=lo, opt=opt, max=hi)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=mode.strongly_typed)
    config = CreateConfig(
        fp16=mode.fp16_flag,
        tf32=False,  # fp32 layers stay fp32 (TensorRT would otherwise use TF32), as torch's fp32 matmuls do
        profiles=[shapes],
        builder_optimization_level=settings.optimization_level,
        memory_pool_limits=memory_pool_limits,
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,  # none yet: start empty
        refittable=settings.refit,  # BuilderFlag.REFIT: new weights by refit.refit_to_weights, no rebuild
    )
    return network, config


def build_engine(onnx_path: Path, profile: dict[str, tuple[Shape, Shape, Shape]], settings: BuildSettings,
                 mode: BuildMode, timing_cache: Path) -> bytes:
    """Parse the ONNX and build a serialized engine with one optimisation profile through Polygraphy,
    reusing the timing cache file and merging this build's timings into it (under Polygraphy's lock)."""
    import tensorrt as trt
    from polygraphy.backend.trt import engine_bytes_from_network
    from polygraphy.exception import PolygraphyException

    network, config = polygraphy_loaders(onnx_path, profile, settings, mode, timing_cache,
                                         {trt.MemoryPoolType.WORKSPACE: settings.workspace_bytes})
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        plan = engine_bytes_from_network(network, config=config, save_timing_cache=str(timing_cache))
    except PolygraphyException as exc:  # parser errors, bad profile names, a failed build
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}: {exc}") from exc
    return bytes(plan)


class TensorRTRunner(Runner):
    """One engine and one execution context. Device buffers persist per input-shape set, keyed by
    tensor name; outputs are those buffers (reused by the next call: copy what must outlive it).
    Work is enqueued with execute_async_v3 on the current torch stream when that is a side stream
    (CUDA-graph capture), otherwise on the runner's own non-default stream."""

    def __init__(self, descriptor: NetworkDescriptor, config: BackendConfig, settings: BuildSettings | None = None):
        super().__init__(descriptor)
        self.config = config
        settings = settings or BuildSettings(precision=config.precision)
        self.settings = dataclasses.replace(settings, precision=descriptor.precision_for(settings.precision))
        self._device = torch.device(config.device if config.device.startswith("cuda") else "cuda")
        self.engine: trt.ICudaEngine | None = None
        self.context: trt.IExecutionContext | None = None
        self.stream: torch.cuda.Stream | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._bound: tuple[Shape, ...] | None = None
        self.folder: Path | None = None  # the engine's cache folder, once active

    @property
    def device(self) -> torch.device:
        return self._device

    def engine_folder(self, key: str) -> Path:
        return self.config.cache_path() / "engines" / f"{self.name}-{self.settings.precision}-{key[:16]}"

    def activate_impl(self) -> None:
        require_tensorrt()
        import tensorrt as trt
        from polygraphy.backend.trt.util import get_trt_logger

        mode = build_mode(self.settings.precision, hasattr(trt.BuilderFlag, "FP16"))
        export_settings = ExportSettings(precision=mode.onnx_precision)
        # a refittable engine is keyed by its graph and refitted to the current weights (refit.py); any
        # other by its export's key, which reads no weights: a cached engine needs neither ONNX nor weights
        onnx_key = (graph_key(self.descriptor, export_settings) if self.settings.refit
                    else export_key(self.descriptor, export_settings.for_network(self.descriptor)))
        platform = current_platform(self._device)
        profile = self.descriptor.profile(self.settings.shape_range)
        key = engine_key(onnx_key, platform, self.settings, mode, profile)
        folder = self.folder = self.engine_folder(key)
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, ValueError):
            meta = None
        reasons = rebuild_reasons(meta, key, platform)
        route_polygraphy_logs()
        trt_logger = get_trt_logger()  # TensorRT's messages reach Python logging, as the builder's do
        runtime = trt.Runtime(trt_logger)
        engine = None
        if not reasons:
            try:
                engine = runtime.deserialize_cuda_engine((folder / ENGINE_FILE).read_bytes())
            except (OSError, RuntimeError):
                engine = None
            if engine is None:
                reasons = ["the cached engine file is corrupt"]
            elif self.settings.refit and meta is not None:
                state = self.descriptor.build_module().state_dict()
                why = refit_to_weights(engine, WeightMap.from_json(meta.get("weights")), state, trt_logger)
                engine, reasons = (engine, []) if not why else (None, [f"cannot refit: {why}"])
        if engine is None:
            export = export_onnx(self.descriptor, self.config.cache_path(), export_settings)  # reads the weights
            weight_map = read_weight_map(export.path) if self.settings.refit else None
            logger.info("building %s engine (%s): %s", self.name, self.settings.precision, "; ".join(reasons))
            clock = time.perf_counter()
            timing_cache = self.config.cache_path() / "engines" / f"timing-{platform.trt_version}-{platform.gpu_name.replace(' ', '_')}.cache"
            plan = build_engine(export.path, profile, self.settings, mode, timing_cache)
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / ENGINE_FILE) as tmp:
                tmp.write_bytes(plan)
            with atomic_path(folder / META_FILE) as tmp:
                tmp.write_text(json.dumps({"key": key, "platform": platform.__dict__, "profile": profile,
                                           "seconds": time.perf_counter() - clock,
                                           "weights": weight_map.to_json() if weight_map else None}, default=list))
            engine = runtime.deserialize_cuda_engine(plan)
        else:
            logger.debug("%s: cached %s engine %s", self.name, self.settings.precision, folder)
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream(self._device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}

    def deactivate_impl(self) -> None:
        self.buffers.clear()
        self.context = self.engine = self.stream = None
        self._bound = None

    def _bind(self, feed: dict[str, torch.Tensor]) -> None:
        """(Re)allocate buffers and set shapes and addresses when the input shapes change."""
        shapes = tuple(tuple(feed[n].shape) for n in self.descriptor.input_names)
        if shapes == self._bound:
            return
        context = self.context
        assert context is not None, "activate() first"
        self.buffers.clear()
        for name, shape in zip(self.descriptor.input_names, shapes, strict=True):
            self.buffers[name] = torch.empty(shape, dtype=self.dtypes[name], device=self._device)
            context.set_input_shape(name, shape)
        for name in self.descriptor.output_names:
            dims = context.get_tensor_shape(name)
            shape = tuple(dims[i] for i in range(len(dims)))
            self.buffers[name] = torch.empty(shape, dtype=self.dtypes[name], device=self._device)
        for name, buffer in self.buffers.items():
            context.set_tensor_address(name, buffer.data_ptr())
        self._bound = shapes

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.descriptor.check_feed(feed, self.settings.shape_range)
        self._bind(feed)
        current = torch.cuda.current_stream(self._device)
        side = current != torch.cuda.default_stream(self._device)
        stream = current if side else self.stream
        assert stream is not None and self.context is not None, "activate() first"
        if not side:
            stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for name in self.descriptor.input_names:
                self.buffers[name].copy_(feed[name], non_blocking=True)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.name}")
        if not side:
            current.wait_stream(stream)
        return {n: self.buffers[n] for n in self.descriptor.output_names}


def build_engines(components: Any, names: list[str], config: BackendConfig,
                  settings: BuildSettings) -> dict[str, Path]:
    """ONNX -> TensorRT engine for each named network (cached; rebuilt only when something changed).
    Returns each engine's cache folder."""
    require_tensorrt()
    descriptors = [get_descriptor(n, components) for n in names]  # unknown names fail before any build
    folders = {}
    for desc in descriptors:
        runner = TensorRTRunner(desc, config, settings)
        runner.activate()
        assert runner.folder is not None
        folders[desc.name] = runner.folder
        runner.deactivate()
    return folders
