"""The inductor backend: each network compiled ahead of time by AOTInductor (torch.export ->
aoti_compile_and_package) into a cached .pt2 package, loaded with aoti_load_package and run behind
the one Runner interface. On a GPU the kernels are Triton's; on the CPU they are C++ (what CI tests).

A package holds kernels only: the weights stay outside (`aot_inductor.package_constants_in_so=False`)
and are given at load time from the network's own weights (as loaded, from the converted-weights
cache), so a package is keyed by architecture, shapes, precision, compile options, torch version and
device, never by weights: a LoRA or another checkpoint of the same architecture loads the same package
(the inductor twin of TensorRT refit). Compile and first load run in a child process
(`build`): a crashing compiler or loader raises PackageBuildError naming the network, the
shapes and the signal, and this process lives. The package is written in a temporary folder and
renamed into the cache with a meta.json recording its hash only after the child loaded it, so a crash
leaves nothing behind, and a stale or corrupt package is rebuilt with the reason logged.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sdcn_trt.cache import atomic_path, hash_file, hash_json
from sdcn_trt.config import BackendConfig
from sdcn_trt.engines.base import Runner
from sdcn_trt.engines.compile_cache import use_compile_cache
from sdcn_trt.engines.inductor.build import PACKAGE, PackageBuildError, as_tuple, build_in_child, load_package
from sdcn_trt.engines.inductor.plan import (
    InductorSettings, architecture, current_target, inductor_status, load_strategy, package_parts, rebuild_reasons,
    unpack_dir,
)
from sdcn_trt.engines.torch import FastPath, cast_input, prepare_module, resolve_device, resolve_dtype
from sdcn_trt.errors import BackendUnavailableError, DeviceMemoryError
from sdcn_trt.export.descriptors import NetworkDescriptor, get_descriptor

__all__ = ["InductorRunner", "PackageBuildError", "PackageResult", "build_package", "build_packages"]

logger = logging.getLogger(__name__)

CACHE_FOLDER, PACKAGE_FILE, META_FILE = "inductor", PACKAGE, "meta.json"


@dataclass
class PackageResult:
    """A compiled (or reused) package of one network."""

    path: Path  # the .pt2 file
    key: str
    cached: bool  # True when nothing was compiled this time
    seconds: float  # the build child's export + compile + load check (0 when cached)
    size_bytes: int
    reasons: list[str] = field(default_factory=list)  # why it was compiled (empty when cached)
    check: dict[str, dict[str, float]] = field(default_factory=dict)  # per output, vs eager torch (seeded weights)
    built_seconds: float = 0.0  # what compiling this package took, when it was compiled (cached or not)
    notes: list[str] = field(default_factory=list)  # e.g. max_autotune skipped for lack of GPU memory
    phases: dict[str, float] = field(default_factory=dict)  # the build's seconds: PHASE_WORDS (plan.py) names them


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


def build_package(descriptor: NetworkDescriptor, device: str | torch.device, precision: str,
                  settings: InductorSettings, cache_dir: Path, force_reason: str = "",
                  timeout: float | None = None) -> PackageResult:
    """Compile `descriptor`'s network for `device` in a child process (or reuse a valid cached package
    of the same architecture, whatever its weights). `force_reason` recompiles even when a valid entry
    exists (a cached package that failed to load)."""
    device = resolve_device(device)
    require_inductor(device.type)
    precision = descriptor.precision_for(precision)
    fast = settings.fast if settings.fast is not None else FastPath.default_for(device, resolve_dtype(precision))
    parts = package_parts(descriptor, hash_json(architecture(descriptor)), precision, settings, fast,
                          current_target(device))
    key = hash_json(parts)
    root = Path(cache_dir) / CACHE_FOLDER
    folder = root / f"{descriptor.name}-{precision}-{key[:16]}"
    meta, problem = (None, force_reason) if force_reason else _read_entry(folder, key)
    if meta is not None:
        return PackageResult(folder / PACKAGE_FILE, key, True, 0.0, meta["size_bytes"], [], meta.get("check", {}),
                             meta.get("seconds", 0.0), meta.get("notes", []), meta.get("phases", {}))
    reasons = [problem] if problem else rebuild_reasons(parts, _newest_parts(root, descriptor.name))
    logger.info("compiling %s with AOTInductor in a child process (%s, %s, %s): %s", descriptor.name, precision,
                device.type, settings.describe(descriptor), "; ".join(reasons))
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    try:
        result = build_in_child(descriptor, device, precision, settings, fast, work, Path(cache_dir), timeout)
        seconds = result.get("compile_s", 0.0) + result.get("load_s", 0.0)
        notes = [n for n in (result.get("autotune_note"), *result.get("load_notes", [])) if n]
        phases = {**result.get("phases", {}), **({"load_s": result["load_s"]} if "load_s" in result else {})}
        size = (work / PACKAGE_FILE).stat().st_size
        meta = {"key": key, "network": descriptor.name, "parts": parts, "size_bytes": size, "seconds": seconds,
                "check": result["check"], "check_weights": "seeded random weights of the same architecture",
                "notes": notes, "reasons": reasons, "phases": phases,
                "files": {PACKAGE_FILE: hash_file(work / PACKAGE_FILE)}}
        for extra in [p for p in work.iterdir() if p.name != PACKAGE_FILE]:
            extra.unlink()  # the child's request and result: meta.json keeps what counts
        with atomic_path(work / META_FILE) as tmp:
            tmp.write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    finally:
        if work.exists():
            shutil.rmtree(work)
    logger.info("compiled %s in %.1f s: %.1f MiB at %s", descriptor.name, seconds, size / 2**20, folder)
    return PackageResult(folder / PACKAGE_FILE, key, False, seconds, size, reasons, result["check"], seconds, notes,
                         phases)


class InductorRunner(Runner):
    """One AOTInductor package with this runner's weights. Float inputs are cast to the network's
    precision, float outputs come back float32; each call returns new tensors (from the graph's pool
    while a CUDA graph captures)."""

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
        cache = self.config.cache_path()
        try:  # inductor's own caches kept too (the loader's CPU probe, the build child's graphs), not in a temp folder
            use_compile_cache(self._device, cache, artifacts=False)
        except OSError as exc:
            logger.warning("compile cache: cannot use %s (%s); inductor keeps its own caches this time", cache, exc)
        build = lambda reason="": build_package(self.descriptor, self._device, self.config.precision,  # noqa: E731
                                                self.settings, cache, reason)
        package = build()
        try:
            model = self._load(package, cache)
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise DeviceMemoryError(f"out of GPU memory while loading the '{self.name}' package "
                                        f"({self.settings.describe(self.descriptor)}): {exc}") from exc
            if isinstance(exc, BackendUnavailableError) or not package.cached:
                raise
            logger.warning("cached package %s does not load (%s); recompiling", package.path, exc)
            package = build(f"the cached package does not load: {exc}")
            model = self._load(package, cache)
        self.package, self.model = package, model

    def _load(self, package: PackageResult, cache: Path) -> Callable[..., Any]:
        """The package loaded here with this runner's weights (a child compiled it and loaded it first)."""
        fast = self.settings.fast if self.settings.fast is not None else FastPath.default_for(self._device, self.dtype)
        module = prepare_module(self.descriptor, self._device, self.dtype, fast)
        strategy = load_strategy(self.settings.load)
        return load_package(package.path, self._device, strategy, module, self.name,
                            unpack_dir(strategy, package.size_bytes, cache))

    def deactivate_impl(self) -> None:
        self.model = None

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.model is not None, "activate() first"
        self.descriptor.check_feed(feed, self.settings.shape_range)
        args = [cast_input(feed[n], self._device, self.dtype) for n in self.descriptor.input_names]
        outputs = as_tuple(self.model(*args))
        return {n: o.float() for n, o in zip(self.descriptor.output_names, outputs, strict=True)}


def build_packages(components: Any, names: list[str], config: BackendConfig,
                   settings: InductorSettings) -> dict[str, PackageResult]:
    """Compile (or reuse) a package for each named network, each in a child process; unknown names
    fail before any compile. No weights are read: packages do not hold them."""
    descriptors = [get_descriptor(n, components) for n in names]
    require_inductor(torch.device(config.device).type)
    return {d.name: build_package(d, config.device, config.precision, settings, config.cache_path())
            for d in descriptors}
