"""The torch backend's runner: the descriptor's module in eager mode, fp32 or fp16, CPU or CUDA."""
from __future__ import annotations

import copy

import torch

from sdcn_trt.engines.base import Runner
from sdcn_trt.config import PRECISIONS, check_choice
from sdcn_trt.errors import BackendUnavailableError
from sdcn_trt.export.descriptors import NetworkDescriptor

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # keyed by config.PRECISIONS


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, with a clear error when CUDA is asked for and absent."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("device 'cuda' was asked for but torch sees no CUDA GPU here")
    return device


def resolve_dtype(precision: str) -> torch.dtype:
    check_choice("precision", precision, PRECISIONS)
    return DTYPES[precision]


class TorchRunner(Runner):
    """Eager torch. Float inputs are cast to the runner's dtype; float outputs come back float32."""

    def __init__(self, descriptor: NetworkDescriptor, device: str | torch.device = "cpu", precision: str = "fp32"):
        super().__init__(descriptor)
        self._device = resolve_device(device)
        self.dtype = resolve_dtype(descriptor.precision_for(precision))
        self.module: torch.nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return self._device

    def activate_impl(self) -> None:
        module = self.descriptor.build_module()
        if self.dtype != torch.float32 or self._device.type != "cpu":
            module = copy.deepcopy(module)  # .to() is in place: leave the shared fp32 CPU components alone
        self.module = module.to(self._device, self.dtype)

    def deactivate_impl(self) -> None:
        self.module = None

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.module is not None
        first = next(self.module.parameters())
        args = [self._cast(feed[n], first.dtype) for n in self.descriptor.input_names]
        with torch.inference_mode():
            out = self.module(*args)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float() for n, o in zip(self.descriptor.output_names, outputs)}

    def _cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(self._device, non_blocking=True)
        return x.to(dtype) if x.is_floating_point() else x
