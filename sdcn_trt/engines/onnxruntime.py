"""The onnxruntime backend's runner: exported ONNX (cached) on the CPU or CUDA execution provider."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from sdcn_trt.config import BackendConfig
from sdcn_trt.engines.base import Runner
from sdcn_trt.errors import BackendUnavailableError
from sdcn_trt.export.descriptors import NetworkDescriptor, ShapeRange, ShapeSpec
from sdcn_trt.export.onnx_export import ExportResult, ExportSettings
from sdcn_trt.export.weights import ort_model, prepare_onnx

logger = logging.getLogger(__name__)

ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int32)": torch.int32,
             "tensor(int64)": torch.int64}
# What the dynamic exports accept: batches up to 64 images (batched runs), sides from 64 to 2048 pixels.
DEFAULT_RANGE = ShapeRange(ShapeSpec(1, 64, 64), ShapeSpec(), ShapeSpec(64, 2048, 2048))


class OnnxRuntimeRunner(Runner):
    """Exports (or reuses) the network's ONNX, then runs it. On CUDA, inputs and outputs stay on the
    GPU through I/O binding; on the CPU, tensors go through numpy. Outputs are float32 tensors."""

    def __init__(self, descriptor: NetworkDescriptor, config: BackendConfig, shape_range: ShapeRange = DEFAULT_RANGE):
        super().__init__(descriptor)
        self.config = config
        self.shape_range = shape_range
        self.session: Any = None  # onnxruntime.InferenceSession once active
        self.export: ExportResult | None = None
        self.input_types: dict[str, torch.dtype] = {}
        self.swapped: list[str] = []  # initializers replaced by the current weights (export/weights.py)
        self.initializers: dict[str, Any] = {}  # OrtValues of swapped weights, alive as long as the session
        self._device = torch.device(config.device)

    @property
    def device(self) -> torch.device:
        return self._device

    def activate_impl(self) -> None:
        import onnxruntime as ort

        settings = ExportSettings(precision=self.config.precision)
        prepared = prepare_onnx(self.descriptor, self.config.cache_path(), settings)  # swaps weights, or exports
        export = self.export = prepared.export
        # a cache hit is a debug line (a warm run shows its progress and summary only), an export news
        logger.log(logging.DEBUG if export.cached else logging.INFO, "%s: %s ONNX at %s (%s)", self.name,
                   settings.precision, export.path, prepared.note if export.cached else f"exported in {export.seconds:.1f} s")
        if self._device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    "onnxruntime has no CUDAExecutionProvider here: pip install onnxruntime-gpu, or use device='cpu'")
            providers = [("CUDAExecutionProvider", {"device_id": self._device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model, self.initializers = ort_model(export.path, prepared.initializers, options)
        self.swapped = sorted(prepared.initializers)
        self.session = ort.InferenceSession(model, options, providers=providers)
        self.input_types = {i.name: ORT_TYPES[i.type] for i in self.session.get_inputs()}

    def deactivate_impl(self) -> None:
        self.session = None
        self.initializers = {}

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.session is not None
        self.descriptor.check_feed(feed, self.shape_range)
        if self._device.type == "cuda":
            return self._infer_cuda(feed)
        inputs = {n: feed[n].detach().to("cpu", self.input_types[n]).numpy() for n in self.descriptor.input_names}
        outputs = self.session.run(self.descriptor.output_names, inputs)
        return {n: torch.from_numpy(np.asarray(o, dtype=np.float32)) for n, o in zip(self.descriptor.output_names, outputs, strict=True)}

    def _infer_cuda(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """I/O binding: ORT reads torch's device memory and allocates its outputs on the GPU."""
        binding = self.session.io_binding()
        kept = []  # keep cast copies alive until the run ends
        for name in self.descriptor.input_names:
            x = feed[name].to(self._device, self.input_types[name]).contiguous()
            kept.append(x)
            binding.bind_input(name, "cuda", self._device.index or 0, _np_dtype(x.dtype), tuple(x.shape), x.data_ptr())
        for name in self.descriptor.output_names:
            binding.bind_output(name, "cuda", self._device.index or 0)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return {n: torch.from_dlpack(o.to_dlpack()).float() if hasattr(o, "to_dlpack")
                else torch.from_numpy(o.numpy()).to(self._device).float()
                for n, o in zip(self.descriptor.output_names, outs, strict=True)}


def _np_dtype(dtype: torch.dtype) -> type:
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32, torch.int64: np.int64}[dtype]
