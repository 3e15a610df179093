"""GPU-free planning for the inductor backend: compile settings, what a package is valid for (its
architecture, not its weights), its cache key, rebuild reasons in words, torch.export's dynamic shapes
from the profile, the ways of loading a package, the constants given to it at load time, max_autotune's
memory check, and the toolchain check."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from sdcn_trt.config import check_choice
from sdcn_trt.engines.compile_cache import cpu_info
from sdcn_trt.engines.torch import FastPath, cpp_compiler_missing, triton_missing
from sdcn_trt.errors import InputError
from sdcn_trt.export.descriptors import NetworkDescriptor, ShapeRange, ShapeSpec

PACKAGE_FORMAT = 2  # bump when the package layout or what goes into the key changes (2: weights outside)
MIN_TORCH = (2, 6)  # torch._inductor.aoti_compile_and_package / aoti_load_package
LOAD_ENV = "SDCN_TRT_INDUCTOR_LOAD"  # the load strategy when InductorSettings names none
WRAPPER_OPT_LEVELS = ("O0", "O1")  # InductorSettings.wrapper_opt


# AOTInductor's own timed sections (torch._dynamo.utils.compilation_time_metrics, torch 2.6 to 2.14) -> our phase
INDUCTOR_PHASES = {
    "GraphLowering.run": "lower_s",  # the exported graph lowered to inductor's IR
    "GraphLowering.codegen": "codegen_s",  # kernels generated (on CUDA: Triton's kernel compiles, in parallel)
    "AotCodeCompiler.compile": "cpp_s",  # g++ on the C++ wrapper (and on the CPU, the C++ kernels' file)
}
PHASE_WORDS = {"setup_s": "set-up", "export_s": "torch.export", "aoti_s": "AOTInductor", "lower_s": "lowering",
               "codegen_s": "code generation", "cpp_s": "C++ compile", "load_s": "load"}


def timed_totals(metrics: Mapping[str, list[float]]) -> dict[str, float]:
    """Seconds so far in each of inductor's timed sections that INDUCTOR_PHASES names."""
    return {key: float(sum(metrics.get(key, []))) for key in INDUCTOR_PHASES}


def inductor_phases(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Where one AOTInductor compile's time went, from `timed_totals` taken before and after it: the
    lowering, the code generation and the C++ compile, in seconds. A section this torch does not time
    is left out, so a reader never takes a missing phase for a free one."""
    phases = {}
    for key, phase in INDUCTOR_PHASES.items():
        spent = after.get(key, 0.0) - before.get(key, 0.0)
        if spent > 0:
            phases[phase] = spent
    return phases


@dataclass(frozen=True)
class InductorSettings:
    """How a network is compiled (every field but `load` is part of the package's cache key) and loaded."""

    shape_range: ShapeRange = ShapeRange.static(ShapeSpec())  # the contest shape by default
    max_autotune: bool = False  # inductor's GEMM/convolution autotuning: faster kernels, much longer builds
    fast: FastPath | None = None  # module changes before export; None: FastPath.default_for(device, dtype)
    load: str | None = None  # a LOAD_STRATEGIES name; None: $SDCN_TRT_INDUCTOR_LOAD, else "default"
    # the C++ wrapper's optimisation level (aot_inductor.compile_wrapper_opt_level; the kernels are compiled
    # apart, at -O3, either way). One g++ process compiles a large graph's wrapper, which only allocates and
    # launches kernels: at O0 the SD1.5 step's C++ compile took 12.3 s instead of 24.2 s (CPU, torch 2.11), and
    # the tiny step ran as fast with bit-identical outputs; on a GPU the loop graph replays the launches anyway
    wrapper_opt: str = "O0"

    def __post_init__(self) -> None:
        lo, hi = self.shape_range.min, self.shape_range.max
        if lo.cfg != hi.cfg:
            raise InputError(f"the CFG multiplier cannot be dynamic: min {lo.cfg}, max {hi.cfg}")
        for name in ("batch", "height", "width"):
            a, opt, b = (getattr(s, name) for s in (lo, self.shape_range.opt, hi))
            if not a <= opt <= b:
                raise InputError(f"shape range {name}: need min <= opt <= max, got {a}, {opt}, {b}")
        load_strategy(self.load)  # an unknown name fails here, listing the valid ones
        check_choice("wrapper_opt", self.wrapper_opt, WRAPPER_OPT_LEVELS)

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

    def inductor_configs(self, max_autotune: bool | None = None) -> dict[str, Any]:
        """Options passed to aoti_compile_and_package: the weights stay out of the package (they are
        given at load time), so a package holds kernels only and serves any weights of its architecture."""
        autotune = self.max_autotune if max_autotune is None else max_autotune
        configs: dict[str, Any] = {"max_autotune": autotune, "aot_inductor.package_constants_in_so": False}
        # always given: inductor's own default reads $AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL, which the key ignores
        configs["aot_inductor.compile_wrapper_opt_level"] = self.wrapper_opt
        return configs

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON (for a build child); `from_json` reads them back."""
        return {"shape_range": {k: asdict(getattr(self.shape_range, k)) for k in ("min", "opt", "max")},
                "max_autotune": self.max_autotune, "fast": asdict(self.fast) if self.fast else None, "load": self.load,
                "wrapper_opt": self.wrapper_opt}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "InductorSettings":
        shapes = {k: ShapeSpec(**v) for k, v in data["shape_range"].items()}
        return cls(ShapeRange(**shapes), bool(data["max_autotune"]), FastPath(**data["fast"]) if data["fast"] else None,
                   data.get("load"), data.get("wrapper_opt", "O1"))

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
    """This process's Target for `device`. On the CPU the capability is ATen's vector ISA and a digest of
    the CPU's feature flags (kernels are compiled with -march=native, and two CPUs of one model name can
    differ), read without compiling anything: inductor's own ISA probe builds test programs with g++ in
    a fresh temp folder, 5.3 of the 6.5 s that loading the SD1.5 packages took in a new process."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return Target(torch.__version__, "cuda", props.name, f"sm_{props.major}{props.minor}")
    capability = torch.backends.cpu.get_cpu_capability().lower()
    flags = isa_flags(cpu_info("flags") or cpu_info("Features"))  # x86 / arm
    if flags:
        capability += " flags " + hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]
    return Target(torch.__version__, "cpu", cpu_model(), capability)


ISA_FLAG_PREFIXES = ("avx", "sse", "ssse", "fma", "f16c", "bmi", "amx", "vnni", "vaes", "vpclmul", "gfni", "aes", "sha",
                     "popcnt", "lzcnt", "abm", "movbe", "adx", "pclmul", "xop", "fp", "asimd", "sve", "sme", "i8mm",
                     "bf16", "dotprod", "atomics", "neon")


def isa_flags(flags: str) -> list[str]:
    """The instruction-set flags among a /proc/cpuinfo flags line, sorted: what -march=native compiles
    for, without the microcode and mitigation flags (ibrs, md_clear, ...) an update or a VM move changes."""
    return sorted(f for f in flags.split() if f.startswith(ISA_FLAG_PREFIXES))


def cpu_model() -> str:
    """The CPU's model name (kernels are compiled with -march=native: another CPU may not run them)."""
    return cpu_info("model name") or platform.processor() or platform.machine()


# -- what a package is valid for ------------------------------------------------------------------
PROVENANCE_KEYS = ("transformers_version", "torch_dtype", "dtype", "architectures")  # and every "_..." key: where a
# config came from (file, library version, dtype held), not what it builds


def network_config(module: Any) -> dict[str, Any]:
    """A network's architecture as JSON: its class and its config without provenance fields, so two
    checkpoints of one architecture (a LoRA, another fine-tune) give the same dict."""
    config = module.config
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    kept = {k: v for k, v in raw.items() if k not in PROVENANCE_KEYS and not k.startswith("_")}
    return {"class": type(module).__name__, "config": json.loads(json.dumps(kept, default=str))}


def architecture(descriptor: NetworkDescriptor) -> dict[str, Any]:
    """The networks' classes and configs the descriptor's module is built from (read without loading
    any weights), and the library versions whose code builds them: what a package's kernels depend on."""
    import diffusers
    import transformers

    components = descriptor.components
    networks = {name: network_config(components.peek(name)) for name in ("text_encoder", "unet", "controlnet", "vae")}
    return {"networks": networks, "more_controlnets": [network_config(c) for c in components.more_controlnets],
            "libraries": {"diffusers": diffusers.__version__, "transformers": transformers.__version__}}


def package_parts(descriptor: NetworkDescriptor, architecture_key: str, precision: str, settings: InductorSettings,
                  fast: FastPath, target: Target) -> dict[str, Any]:
    """Everything a package depends on, by name (JSON-normalised, so it compares equal to a read meta.json);
    shapes are (min, traced, max) per input: the traced shape is inductor's size hint. The weights are
    not among them: they are given at load time."""
    traced = descriptor.shapes(settings.trace_spec())
    parts = {
        "network": descriptor.name,
        "architecture": architecture_key,
        "io": [descriptor.input_names, descriptor.output_names],
        "precision": precision,
        "shapes": {n: [lo, traced[n], hi] for n, (lo, _, hi) in descriptor.profile(settings.shape_range).items()},
        "options": {"max_autotune": settings.max_autotune, "fast": asdict(fast),
                    **({"wrapper_opt": settings.wrapper_opt} if settings.wrapper_opt != "O1" else {})},
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
    for name in ("architecture", "io", "precision", "shapes", "options", "torch", "device", "format"):
        old, new = cached.get(name), parts[name]
        if old == new:
            continue
        if name == "architecture":
            reasons.append("the architecture changed (network configs or diffusers/transformers versions)")
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


def export_dynamic_shapes(forward: Any, specs: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """`specs` (one per input, in order) grouped as torch.export matches them to `forward`'s parameters:
    one entry per named positional parameter, then one tuple for a `*varargs` parameter (the
    networks take their hints, scales and residuals as *varargs)."""
    import inspect

    if specs is None:
        return None
    grouped: list[Any] = []
    rest = list(specs)
    for param in inspect.signature(forward).parameters.values():
        if param.kind == inspect.Parameter.VAR_POSITIONAL:
            grouped.append(tuple(rest))
            rest = []
            break
        if param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) and rest:
            grouped.append(rest.pop(0))
    if rest:
        raise InputError(f"{len(specs)} inputs do not fit the parameters of {getattr(forward, '__qualname__', forward)}")
    return tuple(grouped)


# -- loading a package ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadStrategy:
    """How a package is loaded. The first GPU run's SD1.5-sized package died (SIGSEGV) inside
    AOTIModelPackageLoader, loaded in the process that had just compiled it, with its weights inside,
    single-threaded; each strategy changes one of those (weights are outside the package in all of them)."""

    name: str
    single_threaded: bool  # aoti_load_package(run_single_threaded=...): no locking, what CUDA graph capture needs
    fresh_process: bool  # the build's load check in a new process, not the one that compiled
    unpack_in_cache: bool  # the loader unpacks into a folder of the cache (TMPDIR) instead of the system temp
    note: str


LOAD_STRATEGIES = (
    LoadStrategy("default", True, False, False, "weights given at load time, single-threaded runner"),
    LoadStrategy("multithreaded", False, False, False, "as default, without run_single_threaded (CUDA graph "
                 "capture of the package may then fail)"),
    LoadStrategy("fresh-process", True, True, False, "the build's load check in a new process"),
    LoadStrategy("unpack-in-cache", True, True, True, "a new process that unpacks the package next to the cache, "
                 "not in the system temp folder (torch 2.14's loader honours TMPDIR; 2.11's unpacks into /tmp "
                 "whatever it says, and the load leaves a note)"),
)


def load_strategy(name: str | None) -> LoadStrategy:
    """The strategy called `name` (None: $SDCN_TRT_INDUCTOR_LOAD, else "default"); InputError listing
    the valid names otherwise."""
    wanted = name if name is not None else os.environ.get(LOAD_ENV) or "default"
    for strategy in LOAD_STRATEGIES:
        if strategy.name == wanted:
            return strategy
    where = "" if name is not None else f" (from ${LOAD_ENV})"
    raise InputError(f"unknown inductor load strategy {wanted!r}{where}; valid: "
                     + ", ".join(s.name for s in LOAD_STRATEGIES))


def unpack_dir(strategy: LoadStrategy, package_bytes: int, cache_root: Path) -> Path | None:
    """Where the loader should unpack (torch 2.14's extracts the package's shared library and kernels
    to $TMPDIR; 2.11's to /tmp whatever TMPDIR says): None for the system temp folder, else a folder
    under the cache root. The system temp folder is also left when it lacks twice the package's size."""
    import tempfile

    system = Path(tempfile.gettempdir())
    if not strategy.unpack_in_cache and free_bytes(system) >= 2 * package_bytes:
        return None
    return Path(cache_root) / "inductor" / ".unpack"


def free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def loader_kwargs(strategy: LoadStrategy, device: torch.device) -> dict[str, Any]:
    """aoti_load_package's keyword arguments for `device` under `strategy`."""
    kwargs: dict[str, Any] = {"run_single_threaded": strategy.single_threaded}
    if device.type == "cuda" and device.index is not None:  # cuda:N; plain "cuda" loads on the current device
        kwargs["device_index"] = device.index
    return kwargs


# -- the constants given at load time ------------------------------------------------------------------
def constants_api_missing(compiled: Any) -> str:
    """What the loaded package lacks to take its weights at load time ("" when nothing): torch >= 2.6
    has AOTICompiledModel.get_constant_fqns / load_constants (2.11 and 2.14 alike)."""
    missing = [m for m in ("get_constant_fqns", "load_constants") if not hasattr(compiled, m)]
    if not missing:
        return ""
    return (f"this torch ({torch.__version__}) loads AOTInductor packages without {' / '.join(missing)}, "
            "which packages without weights need: install torch >= 2.6")


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` detached and alone in a storage of exactly its bytes. AOTInductor's update_constant_buffer
    copies the whole storage of each tensor it is given (from the tensor's first element) into the
    constant's slot: a view into a larger storage (a memory-mapped weights file, a fused QKV weight)
    would overflow it. A dense view is given on the same memory, through a slice of its storage (no
    copy; the slice keeps the memory alive), in its own layout; anything else is copied, dense, with
    its layout kept where it had one (clone's preserve_format: channels_last stays channels_last)."""
    tensor = tensor.detach()
    whole = tensor.numel() * tensor.element_size()
    dense = tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))
    if not dense or whole == 0:
        return tensor.clone()
    if tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == whole:
        return tensor
    start = tensor.storage_offset() * tensor.element_size()
    memory = tensor.untyped_storage()[start:start + whole]
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(memory, 0, tensor.shape, tensor.stride())


def check_constants(fqns: list[str], tensors: Mapping[str, torch.Tensor], network: str) -> None:
    """InputError naming what is missing or extra when the module does not match the package (`fqns`:
    its get_constant_fqns())."""
    missing = [f for f in fqns if f not in tensors]
    if missing:
        extra = sorted(set(tensors) - set(fqns))
        raise InputError(f"the '{network}' package needs {len(missing)} tensors the module does not have "
                         f"(first: {missing[:3]}; the module has {len(extra)} the package does not need, first: "
                         f"{extra[:3]}): the package was compiled for another architecture")


def constant_batches(fqns: list[str], tensors: Mapping[str, torch.Tensor], network: str,
                     batch_bytes: int = 256 * 2**20) -> Iterator[dict[str, torch.Tensor]]:
    """The tensors a package asks for (`fqns`: its get_constant_fqns()), each in storage of its own
    (own_storage), in batches of about `batch_bytes` made as they are asked for: a package that takes
    its weights batch by batch never holds the copies own_storage may make of all of them at once. The
    names are checked before any batch."""
    check_constants(fqns, tensors, network)
    batch: dict[str, torch.Tensor] = {}
    size = 0
    for fqn in fqns:
        batch[fqn] = own_storage(tensors[fqn])
        size += batch[fqn].numel() * batch[fqn].element_size()
        if size >= batch_bytes:
            yield batch
            batch, size = {}, 0
    if batch:
        yield batch


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (non-persistent buffers too: the package needs CLIP's
    position_ids, which no state dict holds)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


# -- max_autotune and device memory ------------------------------------------------------------------
AUTOTUNE_HEADROOM = 3.0  # GPU memory max_autotune wants, in multiples of the network's weights (benchmarking
# candidate kernels holds extra inputs, outputs and workspaces beside the module and its eager outputs)


def autotune_fits(free: int, weights: int) -> tuple[bool, str]:
    """(True, "") when `free` GPU bytes leave max_autotune room beside `weights` bytes of weights; else
    (False, why) for the warning that precedes the fallback to the default compile."""
    need = int(AUTOTUNE_HEADROOM * weights) + 2**30
    if free >= need:
        return True, ""
    return False, (f"the GPU has {free / 2**30:.1f} GiB free and max_autotune wants about {need / 2**30:.1f} GiB "
                   f"({AUTOTUNE_HEADROOM:g}x the {weights / 2**30:.1f} GiB of weights + 1 GiB)")


# -- toolchain ---------------------------------------------------------------------------------------
def cuda_headers_found() -> tuple[bool, str]:
    """(found, where looked): cuda_runtime_api.h in the include folders AOTInductor compiles against."""
    try:
        from torch.utils import cpp_extension

        folders = cpp_extension.include_paths("cuda")
    except (OSError, RuntimeError) as exc:  # CUDA_HOME unset and no toolkit found
        return False, str(exc)
    found = any((Path(f) / "cuda_runtime_api.h").is_file() for f in folders)
    return found, ", ".join(folders)


def torch_release() -> tuple[int, int]:
    """This torch's (major, minor): (2, 11) for '2.11.0+cu130'."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def inductor_status(device_type: str | None = None) -> tuple[bool, str]:
    """(usable, what is missing): torch with AOTInductor and a C++ compiler; on 'cuda' also a GPU,
    Triton and the CUDA runtime headers."""
    if torch_release() < MIN_TORCH:
        return False, f"torch {torch.__version__} has no AOTInductor packages: install torch >= 2.6"
    missing = cpp_compiler_missing("AOTInductor")
    if missing:
        return False, missing
    if device_type != "cuda":
        return True, ""
    if not torch.cuda.is_available():
        return False, "device 'cuda' was asked for but torch sees no CUDA GPU here"
    missing = triton_missing("AOTInductor on a GPU")
    if missing:
        return False, missing
    found, where = cuda_headers_found()
    if not found:
        return False, (f"AOTInductor on a GPU compiles against the CUDA runtime headers and cuda_runtime_api.h "
                       f"was not found (looked in: {where}): install the CUDA toolkit or set CUDA_HOME to one")
    return True, ""
