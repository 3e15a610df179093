"""The one runner interface every backend implements: activate / infer(feed) -> outputs / deactivate."""
from __future__ import annotations

import abc
from typing import Any

import torch

from sdcn_trt.errors import SdcnError
from sdcn_trt.export.descriptors import NetworkDescriptor


class NonFiniteOutputError(SdcnError, FloatingPointError):
    """A network produced NaN or Inf (fp16 overflow, typically); the message names it."""


class Runner(abc.ABC):
    """Runs one network. `infer` takes and returns torch tensors keyed by the descriptor's names.

    Outputs may be buffers the runner reuses on the next call (TensorRT, CUDA graphs): copy
    them if they must outlive it. Use as a context manager, or call activate()/deactivate().
    """

    def __init__(self, descriptor: NetworkDescriptor):
        self.descriptor = descriptor
        self.name = descriptor.name
        self.is_active = False
        self.check_finite = False  # check outputs for NaN/Inf (a host sync per call; off during capture)

    def activate(self) -> "Runner":
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.is_active:
            self.activate()
        outputs = self.infer_impl(feed)
        if self.check_finite and not _capturing():
            for name, tensor in outputs.items():
                bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
                if bad:
                    why = ("fp16 overflow is the usual cause: try precision='fp32'" if tensor.dtype == torch.float16
                           else f"in {tensor.dtype}, look at the inputs: an extreme scale or eta, or broken weights")
                    raise NonFiniteOutputError(f"network '{self.name}' produced {bad} NaN/Inf values in '{name}' "
                                               f"(of {tensor.numel()}); {why}")
        return outputs

    def prepare(self, constants: dict[str, torch.Tensor]) -> None:
        """Inputs that stay the same over the calls that follow (one image's text embedding, hints and control
        scales, by input name): a runner may compute here, once, what depends on them alone (the torch runner
        with FastPath.cross_kv: every cross-attention's K/V of the text). A later call given these very tensor
        objects may use it, and the caller prepares again whenever it changes their contents (the loops do, per
        image); a call given other tensors computes everything. Nothing by default."""

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    @property
    def device(self) -> torch.device:
        """Where the runner wants its inputs (and leaves its outputs)."""
        return torch.device("cpu")

    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def deactivate_impl(self) -> None:
        """Release what activate_impl allocated; nothing by default."""


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
