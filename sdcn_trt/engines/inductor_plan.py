"""GPU-free planning for the inductor backend: compile settings, what a package is valid for, its cache
key, rebuild reasons in words, torch.export's dynamic shapes from a profile, and the toolchain check."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sdcn_trt.engines.torch import FastPath
from sdcn_trt.errors import InputError
from sdcn_trt.export.descriptors import NetworkDescriptor, ShapeRange, ShapeSpec

PACKAGE_FORMAT = 1  # bump when the package layout or what goes into the key changes
MIN_TORCH = (2, 6)  # torch._inductor.aoti_compile_and_package / aoti_load_package


@dataclass(frozen=True)
class InductorSettings:
    """How a network is compiled; every field is part of the package's cache key."""

    shape_range: ShapeRange = ShapeRange.static(ShapeSpec())  # the contest shape by default
    max_autotune: bool = False  # inductor's GEMM/convolution autotuning: faster kernels, much longer builds
    fast: FastPath | None = None  # module changes before export; None: FastPath.default_for(device, dtype)

    def __post_init__(self) -> None:
        lo, hi = self.shape_range.min, self.shape_range.max
        if lo.cfg != hi.cfg:
            raise InputError(f"the CFG multiplier cannot be dynamic: min {lo.cfg}, max {hi.cfg}")
        for name in ("batch", "height", "width"):
            a, opt, b = (getattr(s, name) for s in (lo, self.shape_range.opt, hi))
            if not a <= opt <= b:
                raise InputError(f"shape range {name}: need min <= opt <= max, got {a}, {opt}, {b}")

    @property
    def dynamic(self) -> bool:
        return self.shape_range.min != self.shape_range.max

    def trace_spec(self) -> ShapeSpec:
        """The shape torch.export traces at: opt, but batch 2 when the batch is dynamic (export
        specialises sizes 0 and 1, which would pin a dynamic batch of 1)."""
        lo, opt, hi = self.shape_range.min, self.shape_range.opt, self.shape_range.max
        if lo.batch != hi.batch and opt.batch == 1 and hi.batch >= 2:
            return dataclasses.replace(opt, batch=2)
        return opt

    def inductor_configs(self) -> dict[str, Any]:
        """Options passed to aoti_compile_and_package."""
        return {"max_autotune": self.max_autotune}

    def describe(self, descriptor: NetworkDescriptor) -> str:
        """The shapes in words, for logs and errors: 'latents (1, 4, 32, 48), ...' or min..max ranges."""
        profile = descriptor.profile(self.shape_range)
        return ", ".join(f"{n} {lo}" if lo == hi else f"{n} {lo}..{hi}" for n, (lo, _, hi) in profile.items())


@dataclass(frozen=True)
class Target:
    """What a compiled package is only valid for: the torch that compiled it and the device it runs on."""

    torch_version: str
    device_type: str  # "cpu" or "cuda"
    device_name: str  # the GPU's name, or the CPU's model
    capability: str  # "sm_90" on a GPU; on the CPU the vector ISA the kernels were compiled for


def current_target(device: torch.device) -> Target:
    """This process's Target for `device` (imports inductor's CPU ISA probe on the CPU)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return Target(torch.__version__, "cuda", props.name, f"sm_{props.major}{props.minor}")
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return Target(torch.__version__, "cpu", cpu_model(), str(pick_vec_isa()) or "scalar")


def cpu_model() -> str:
    """The CPU's model name (kernels are compiled with -march=native: another CPU may not run them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_parts(descriptor: NetworkDescriptor, weights: str, precision: str, settings: InductorSettings,
                  fast: FastPath, target: Target) -> dict[str, Any]:
    """Everything a package depends on, by name (JSON-normalised, so it compares equal to a read meta.json);
    shapes are (min, traced, max) per input: the traced shape is inductor's size hint."""
    traced = descriptor.shapes(settings.trace_spec())
    parts = {
        "network": descriptor.name,
        "weights": weights,
        "io": [descriptor.input_names, descriptor.output_names],
        "precision": precision,
        "shapes": {n: [lo, traced[n], hi] for n, (lo, _, hi) in descriptor.profile(settings.shape_range).items()},
        "options": {"max_autotune": settings.max_autotune, "fast": asdict(fast)},
        "torch": target.torch_version,
        "device": {"type": target.device_type, "name": target.device_name, "capability": target.capability},
        "format": PACKAGE_FORMAT,
    }
    return json.loads(json.dumps(parts))


def rebuild_reasons(parts: dict[str, Any], cached: dict[str, Any] | None) -> list[str]:
    """Why `parts` needs a new package, in words, given the parts of the newest cached package of the
    same network (None: there is none)."""
    if cached is None:
        return ["no cached package"]
    reasons = []
    for name in ("weights", "io", "precision", "shapes", "options", "torch", "device", "format"):
        old, new = cached.get(name), parts[name]
        if old == new:
            continue
        if name == "weights":
            reasons.append("the weights changed")
        elif name == "shapes":
            changed = [f"{n} {_span(old.get(n) if isinstance(old, dict) else None)} -> {_span(v)}"
                       for n, v in new.items() if not isinstance(old, dict) or old.get(n) != v]
            reasons.append("the shapes changed: " + ", ".join(changed))
        elif name == "torch":
            reasons.append(f"compiled by torch {old}, running torch {new}")
        elif name == "device":
            reasons.append(f"compiled for {_device(old)}, running on {_device(new)}")
        else:
            reasons.append(f"the {name} changed: {old} -> {new}")
    return reasons or ["no cached package for these settings"]


def _span(span: Any) -> str:
    if not span:
        return "none"
    lo, hi = tuple(span[0]), tuple(span[-1])
    return str(lo) if lo == hi else f"{lo}..{hi}"


def _device(device: Any) -> str:
    if not isinstance(device, dict):
        return str(device)
    return f"{device.get('type')} {device.get('name')} ({device.get('capability')})"


def dynamic_shapes(descriptor: NetworkDescriptor, shape_range: ShapeRange) -> tuple[dict[int, Any] | None, ...] | None:
    """torch.export's `dynamic_shapes` for the descriptor's inputs (in order): every axis whose min and
    max differ becomes Dim.AUTO(min, max), so export finds the relations (2B, H = 8h) itself."""
    from torch.export import Dim

    profile = descriptor.profile(shape_range)
    specs: list[dict[int, Any] | None] = []
    for name in descriptor.input_names:
        lo, _, hi = profile[name]
        axes = {i: Dim.AUTO(min=a, max=b) for i, (a, b) in enumerate(zip(lo, hi, strict=True)) if a != b}
        specs.append(axes or None)
    return tuple(specs) if any(specs) else None


# -- toolchain ---------------------------------------------------------------------------------------
def cpp_compiler() -> str:
    """The C++ compiler inductor calls: $CXX, else g++."""
    return os.environ.get("CXX") or "g++"


def cuda_headers_found() -> tuple[bool, str]:
    """(found, where looked): cuda_runtime_api.h in the include folders AOTInductor compiles against."""
    try:
        from torch.utils import cpp_extension

        folders = cpp_extension.include_paths("cuda")
    except (OSError, RuntimeError) as exc:  # CUDA_HOME unset and no toolkit found
        return False, str(exc)
    found = any((Path(f) / "cuda_runtime_api.h").is_file() for f in folders)
    return found, ", ".join(folders)


def inductor_status(device_type: str | None = None) -> tuple[bool, str]:
    """(usable, what is missing): torch with AOTInductor and a C++ compiler; on 'cuda' also a GPU,
    Triton and the CUDA runtime headers."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        return False, f"torch {torch.__version__} has no AOTInductor packages: install torch >= 2.6"
    cxx = cpp_compiler()
    if shutil.which(cxx) is None:
        return False, (f"AOTInductor needs a C++ compiler and '{cxx}' was not found on PATH: install g++ "
                       "(apt-get install g++) or set CXX to one")
    if device_type != "cuda":
        return True, ""
    if not torch.cuda.is_available():
        return False, "device 'cuda' was asked for but torch sees no CUDA GPU here"
    if importlib.util.find_spec("triton") is None:
        return False, "AOTInductor on a GPU needs Triton, which is not installed: pip install triton"
    found, where = cuda_headers_found()
    if not found:
        return False, (f"AOTInductor on a GPU compiles against the CUDA runtime headers and cuda_runtime_api.h "
                       f"was not found (looked in: {where}): install the CUDA toolkit or set CUDA_HOME to one")
    return True, ""
