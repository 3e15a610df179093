"""The inductor backend: each network compiled ahead of time by AOTInductor (torch.export ->
aoti_compile_and_package) into a cached .pt2 package, loaded with aoti_load_package and run behind
the one Runner interface. On a GPU the kernels are Triton's; on the CPU they are C++ (what CI tests).

A package is valid for one set of weights, shapes (static, or a dynamic range from the descriptor's
profile), precision, compile options, torch version and device; all of them form its cache key. It
is compiled in a temporary folder, checked against the eager module, and renamed into place with a
meta.json recording its hash, so a crash leaves nothing that looks finished and a stale or corrupt
package is rebuilt with the reason logged.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sdcn_trt.cache import atomic_path, hash_file, hash_json
from sdcn_trt.config import BackendConfig
from sdcn_trt.engines.base import Runner
from sdcn_trt.engines.inductor_plan import (
    InductorSettings, current_target, dynamic_shapes, inductor_status, package_parts, rebuild_reasons,
)
from sdcn_trt.engines.torch import FastPath, cast_input, prepare_module, resolve_device, resolve_dtype
from sdcn_trt.errors import BackendUnavailableError, DeviceMemoryError, SdcnError
from sdcn_trt.export.descriptors import NetworkDescriptor, get_descriptor
from sdcn_trt.export.onnx_export import compare_outputs

logger = logging.getLogger(__name__)

CACHE_FOLDER, PACKAGE_FILE, META_FILE = "inductor", "model.pt2", "meta.json"


class PackageBuildError(SdcnError, RuntimeError):
    """torch.export or AOTInductor failed on a network; the message names it, its shapes and the cause."""


@dataclass
class PackageResult:
    """A compiled (or reused) package of one network."""

    path: Path  # the .pt2 file
    key: str
    cached: bool  # True when nothing was compiled this time
    seconds: float  # export + compile + check time (0 when cached)
    size_bytes: int
    reasons: list[str] = field(default_factory=list)  # why it was compiled (empty when cached)
    check: dict[str, dict[str, float]] = field(default_factory=dict)  # per output, vs the eager module
    built_seconds: float = 0.0  # what compiling this package took, when it was compiled (cached or not)
    loaded: Any = field(default=None, repr=False, compare=False)  # the callable the check ran, when compiled now


def weights_hash(descriptor: NetworkDescriptor, precision: str = "fp32") -> str:
    """The key of the weights the network reads, as the ONNX export key takes it: the content key of
    their source while they are as loaded (no tensor is read), else a hash of the tensors."""
    return descriptor.components.weights_id(precision)


def require_inductor(device_type: str) -> None:
    """BackendUnavailableError naming what is missing (a C++ compiler, Triton, a GPU, CUDA headers)."""
    ok, why = inductor_status(device_type)
    if not ok:
        raise BackendUnavailableError(f"backend 'inductor' is unavailable: {why}")


def _read_entry(folder: Path, key: str) -> tuple[dict[str, Any] | None, str]:
    """(metadata, "") for a complete entry whose package matches its recorded hash; else (None, why not)."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None, ""
    if meta.get("key") != key:
        return None, "the cached entry's key does not match"
    try:
        if hash_file(folder / PACKAGE_FILE) != meta["files"][PACKAGE_FILE]:
            return None, "the cached package is corrupt (hash mismatch)"
    except (OSError, KeyError):
        return None, "the cached package is missing"
    return meta, ""


def _newest_parts(root: Path, network: str) -> dict[str, Any] | None:
    """The key parts of the most recently written package of `network`, to say what changed."""
    metas = []
    for path in root.glob(f"{network}-*/{META_FILE}"):
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("network") == network and "parts" in meta:
            metas.append((path.stat().st_mtime, meta["parts"]))
    return max(metas, key=lambda m: m[0])[1] if metas else None


def load_compiled(path: Path, device: torch.device) -> Callable[..., Any]:
    """The package's callable (takes the inputs in the descriptor's order). Single-threaded: no
    cross-thread locking inside a run, which CUDA graph capture needs."""
    from torch._inductor import aoti_load_package

    if device.type == "cuda" and device.index is not None:  # cuda:N; plain "cuda" loads on the current device
        return aoti_load_package(str(path), run_single_threaded=True, device_index=device.index)
    return aoti_load_package(str(path), run_single_threaded=True)


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _compile(descriptor: NetworkDescriptor, device: torch.device, dtype: torch.dtype, settings: InductorSettings,
             fast: FastPath, target: Path) -> tuple[dict[str, dict[str, float]], Callable[..., Any]]:
    """torch.export + AOTInductor into `target`; returns the package's difference from the eager
    module on the descriptor's sample inputs, and the loaded package."""
    from torch._inductor import aoti_compile_and_package

    module = prepare_module(descriptor, device, dtype, fast)
    feed = descriptor.sample_inputs(settings.trace_spec(), device)
    args = tuple(cast_input(feed[n], device, dtype) for n in descriptor.input_names)
    with torch.inference_mode(False), torch.no_grad():
        expected = _as_tuple(module(*args))
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes(descriptor, settings.shape_range),
                                      strict=False)
        aoti_compile_and_package(program, package_path=str(target), inductor_configs=settings.inductor_configs())
        del program, module
        compiled = load_compiled(target, device)
        actual = _as_tuple(compiled(*args))
    names = descriptor.output_names
    check = compare_outputs({n: e.float().cpu().numpy() for n, e in zip(names, expected, strict=True)},
                            {n: a.float().cpu().numpy().astype(np.float32) for n, a in zip(names, actual, strict=True)})
    return check, compiled


def build_package(descriptor: NetworkDescriptor, device: str | torch.device, precision: str,
                  settings: InductorSettings, cache_dir: Path, force_reason: str = "") -> PackageResult:
    """Compile `descriptor`'s network for `device` (or reuse a valid cached package). `force_reason`
    recompiles even when a valid entry exists (a cached package that failed to load)."""
    device = resolve_device(device)
    require_inductor(device.type)
    dtype = resolve_dtype(descriptor.precision_for(precision))
    precision = descriptor.precision_for(precision)
    fast = settings.fast if settings.fast is not None else FastPath.default_for(device, dtype)
    parts = package_parts(descriptor, weights_hash(descriptor, precision), precision, settings, fast,
                          current_target(device))
    key = hash_json(parts)
    root = Path(cache_dir) / CACHE_FOLDER
    folder = root / f"{descriptor.name}-{precision}-{key[:16]}"
    meta, problem = (None, force_reason) if force_reason else _read_entry(folder, key)
    if meta is not None:
        return PackageResult(folder / PACKAGE_FILE, key, True, 0.0, meta["size_bytes"], [], meta.get("check", {}),
                             meta.get("seconds", 0.0))
    reasons = [problem] if problem else rebuild_reasons(parts, _newest_parts(root, descriptor.name))
    shapes = settings.describe(descriptor)
    logger.info("compiling %s with AOTInductor (%s, %s, %s): %s", descriptor.name, precision, device.type, shapes,
                "; ".join(reasons))
    clock = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    try:
        try:
            check, compiled = _compile(descriptor, device, dtype, settings, fast, work / PACKAGE_FILE)
        except torch.OutOfMemoryError as exc:
            raise DeviceMemoryError(f"out of GPU memory while compiling '{descriptor.name}' ({precision}, {shapes}) "
                                    f"with AOTInductor: {exc}") from exc
        except SdcnError:
            raise
        except Exception as exc:  # export and inductor raise many types; name the network and keep the cause
            raise PackageBuildError(f"AOTInductor could not compile '{descriptor.name}' ({precision}, {device.type}, "
                                    f"{shapes}): {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - clock
        size = (work / PACKAGE_FILE).stat().st_size
        meta = {"key": key, "network": descriptor.name, "parts": parts, "size_bytes": size, "seconds": seconds,
                "check": check, "reasons": reasons, "files": {PACKAGE_FILE: hash_file(work / PACKAGE_FILE)}}
        with atomic_path(work / META_FILE) as tmp:
            tmp.write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    finally:
        if work.exists():
            shutil.rmtree(work)
    logger.info("compiled %s in %.1f s: %.1f MiB at %s", descriptor.name, seconds, size / 2**20, folder)
    return PackageResult(folder / PACKAGE_FILE, key, False, seconds, size, reasons, check, seconds, compiled)


class InductorRunner(Runner):
    """One AOTInductor package. Float inputs are cast to the network's precision, float outputs come
    back float32; each call returns new tensors (from the graph's pool while a CUDA graph captures)."""

    def __init__(self, descriptor: NetworkDescriptor, config: BackendConfig, settings: InductorSettings | None = None):
        super().__init__(descriptor)
        self.config = config
        self.settings = settings or InductorSettings()
        self._device = torch.device(config.device)
        self.dtype = resolve_dtype(descriptor.precision_for(config.precision))
        self.model: Callable[..., Any] | None = None
        self.package: PackageResult | None = None  # what activate() compiled or reused

    @property
    def device(self) -> torch.device:
        return self._device

    def activate_impl(self) -> None:
        self._device = resolve_device(self._device)
        build = lambda reason="": build_package(self.descriptor, self._device, self.config.precision,  # noqa: E731
                                                self.settings, self.config.cache_path(), reason)
        package = build()
        try:
            model = self._load(package)
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise DeviceMemoryError(f"out of GPU memory while loading the '{self.name}' package "
                                        f"({self.settings.describe(self.descriptor)}): {exc}") from exc
            if not package.cached:
                raise PackageBuildError(f"the package just compiled for '{self.name}' does not load: {exc}") from exc
            logger.warning("cached package %s does not load (%s); recompiling", package.path, exc)
            package = build(f"the cached package does not load: {exc}")
            model = self._load(package)
        self.package, self.model = package, model

    def _load(self, package: PackageResult) -> Callable[..., Any]:
        """The package's callable: the one its build check ran, or loaded from the cache."""
        model, package.loaded = package.loaded, None  # the runner holds it from here
        return model if model is not None else load_compiled(package.path, self._device)

    def deactivate_impl(self) -> None:
        self.model = None

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.model is not None, "activate() first"
        self.descriptor.check_feed(feed, self.settings.shape_range)
        args = [cast_input(feed[n], self._device, self.dtype) for n in self.descriptor.input_names]
        outputs = _as_tuple(self.model(*args))
        return {n: o.float() for n, o in zip(self.descriptor.output_names, outputs, strict=True)}


def build_packages(components: Any, names: list[str], config: BackendConfig,
                   settings: InductorSettings) -> dict[str, PackageResult]:
    """Compile (or reuse) a package for each named network; unknown names fail before any compile."""
    descriptors = [get_descriptor(n, components) for n in names]
    require_inductor(torch.device(config.device).type)
    results = {}
    for desc in descriptors:
        results[desc.name] = build_package(desc, config.device, config.precision, settings, config.cache_path())
        results[desc.name].loaded = None  # free each network's weights before compiling the next
    return results
