"""Settings, validated once: GenerationConfig (the contest's `process()` call) and BackendConfig
(which backend runs the networks, where, in what precision), and the names they accept."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from sdcn_trt.cache import cache_root
from sdcn_trt.errors import InputError
from sdcn_trt.samplers import check_eta, check_sampler, sampler_schedule
from sdcn_trt.schedule import parse_schedule

# The reference seeds through pytorch_lightning's seed_everything, which only takes seeds numpy
# accepts (0 .. 2**32 - 1); -1 means "pick one at random" as the original gradio app does.
SEED_MIN = 0
SEED_MAX = 2**32 - 1
NUM_CONTROL_SCALES = 13  # ControlNet residuals: 12 down-block outputs + 1 mid-block output
GUESS_MODE_DECAY = 0.825  # the original code's magic number: 0.825 ** 12 < 0.01
STRENGTH_MAX = 2.0  # ControlNet strengths beyond this only break images (the web UIs' slider ends here too)
CONTEST_HEIGHT, CONTEST_WIDTH = 256, 384  # the contest's photos after resize_image at resolution 256

BACKENDS = ("torch", "onnxruntime", "tensorrt", "inductor")  # inductor: AOTInductor packages (C++ / Triton)
BUILT_BACKENDS = ("tensorrt", "inductor")  # engines built for fixed shape ranges (the contest shape by default)
PRECISIONS = ("fp32", "fp16")  # fp32 is the reference
GRAPH_MODES = ("off", "step", "loop")  # CUDA graphs: none, one per step, the whole loop + decode
# the torch backend's torch.compile modes (JIT inductor: fused Triton kernels on CUDA, C++ on the CPU). The
# modes with CUDA graph trees of their own (reduce-overhead, max-autotune) are left out: cuda_graph captures
# the whole loop instead, around the compiled kernels.
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")
# inductor settings torch.compile can add (BackendConfig.compile_flags), each measured alone by
# `benchmarks.fast_path --inductor`: diffusers' "diffusion-fast" recipe. Off until a GPU run says which win.
# what torch.compile compiles: the whole network as one graph, or each transformer / ResNet block / resampler
# apart ("regional compilation": blocks of one kind and shape share a compile; the glue between them runs eager)
COMPILE_SCOPES = ("whole", "blocks")
COMPILE_FLAGS = {
    "conv_1x1_as_mm": {"conv_1x1_as_mm": True},  # 1x1 convolutions as GEMMs (fusable with their neighbours)
    "coordinate_descent_tuning": {"coordinate_descent_tuning": True},  # tune each Triton kernel's launch parameters
    "no_epilogue_fusion": {"epilogue_fusion": False},  # no pointwise epilogues fused into template GEMMs
}
# every network a runner can run, by name (export.descriptors has one descriptor for each, and checks it)
NETWORKS = ("text_encoder", "control_hint", "controlnet", "unet", "fused_step", "unet_deep", "unet_shallow",
            "vae_decoder", "vae_encoder")


def check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    """InputError naming the setting, the bad value and the valid choices."""
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


@dataclass
class GenerationConfig:
    """The contest's canny2image settings; defaults are the contest's reference call."""

    prompt: str = "a bird"
    a_prompt: str = "best quality, extremely detailed"  # appended to the prompt after ", "
    n_prompt: str = "longbody, lowres, bad anatomy, bad hands, missing fingers"  # negative prompt
    num_samples: int = 1  # images per input
    image_resolution: int = 256  # short side after resize, rounded to a multiple of 64
    ddim_steps: int = 20
    guess_mode: bool = False  # control on the conditional half only, decaying scales
    strength: float = 1.0  # ControlNet conditioning scale, 0..2
    scale: float = 9.0  # classifier-free guidance scale
    seed: int = 2946901  # -1 draws a random seed in 0..65535 like the original app
    eta: float = 0.0  # DDIM eta; > 0 adds noise every step
    low_threshold: int = 100  # cv2.Canny thresholds
    high_threshold: int = 200
    schedule: str = "full"  # which networks each step runs (sdcn_trt.schedule); "full" is the reference
    max_side: int = 2048  # refuse inputs whose resized long side would exceed this (before any compute)
    eps_steps: int = 0  # old spelling of schedule="eps=N"; folded into `schedule` (and reset to 0) when made
    controlnet_strengths: tuple[float, ...] = ()  # one per ControlNet (Multi-ControlNet); () = `strength` for all
    sampler: str = "ddim"  # sdcn_trt.samplers: ldm's DDIM (the reference) or a table sampler; ddim_steps counts its steps

    def __post_init__(self) -> None:
        _check_int(self, "num_samples", 1)
        _check_int(self, "image_resolution", 64)
        _check_int(self, "ddim_steps", 1)
        for name in ("strength", "scale", "eta"):
            _check_number(name, getattr(self, name))
        if self.strength > STRENGTH_MAX:
            raise InputError(f"strength must be in 0..{STRENGTH_MAX}, got {self.strength}")
        self.controlnet_strengths = tuple(self.controlnet_strengths)
        for k, value in enumerate(self.controlnet_strengths):
            _check_number(f"controlnet_strengths[{k}]", value)
            if value > STRENGTH_MAX:
                raise InputError(f"controlnet_strengths[{k}] must be in 0..{STRENGTH_MAX}, got {value}")
        for name in ("low_threshold", "high_threshold", "eps_steps"):
            _check_int(self, name, 0)
        _check_int(self, "max_side", 64)
        if self.low_threshold > self.high_threshold:
            raise InputError(
                f"low_threshold ({self.low_threshold}) must not exceed high_threshold ({self.high_threshold})"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if self.seed != -1 and not SEED_MIN <= self.seed <= SEED_MAX:
            raise InputError(f"seed must be -1 (random) or in {SEED_MIN}..{SEED_MAX}, got {self.seed}")
        for name in ("prompt", "a_prompt", "n_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.guess_mode, bool):
            raise InputError(f"guess_mode must be True or False, got {self.guess_mode!r}")
        if self.eps_steps:
            if self.schedule != "full":
                raise InputError(f"give either eps_steps={self.eps_steps} or schedule={self.schedule!r}, not both")
            self.schedule, self.eps_steps = f"eps={self.eps_steps}", 0
        check_sampler(self.sampler)
        check_eta(self.sampler, self.eta)
        parsed = parse_schedule(self.schedule)
        parsed.resolve(self.ddim_steps, self.sampler)  # range errors now, not mid-run
        self.schedule = parsed.spec
        # a step count the sampler refuses fails here, before any weights load (checked with SD1.5's scheduler
        # fields; a model folder's own config is checked again when its pipeline builds the table)
        if self.sampler != "ddim":
            sampler_schedule(self.sampler, parsed.steps_for(self.ddim_steps))

    def step_kinds(self) -> tuple[int, tuple[str, ...]]:
        """(steps to run, the kind of every step in run order) under this config's sampler and schedule."""
        parsed = parse_schedule(self.schedule)
        return parsed.steps_for(self.ddim_steps), parsed.resolve(self.ddim_steps, self.sampler)

    @property
    def positive_prompt(self) -> str:
        """The text the reference encodes for the conditional half: `prompt + ', ' + a_prompt`."""
        return self.prompt + ", " + self.a_prompt if self.a_prompt else self.prompt

    def control_scales(self, count: int = NUM_CONTROL_SCALES,
                       strength: float | None = None) -> tuple[list[float], list[float]]:
        """(unconditional, conditional) scales of the first `count` residuals, as the original computes them.

        Guess mode: `strength * 0.825 ** (12 - i)` on the conditional half and no control at all
        on the unconditional half (zero residuals); otherwise `strength` on both halves. The
        original zips 13 scales with the model's residuals, so a smaller model takes the first
        `count` (SD1.5 has exactly 13).
        """
        strength = self.strength if strength is None else strength
        if self.guess_mode:
            cond = [strength * (GUESS_MODE_DECAY ** float(12 - i)) for i in range(count)]
            return [0.0] * count, cond
        return [float(strength)] * count, [float(strength)] * count

    def controlnet_scales(self, nets: int, count: int = NUM_CONTROL_SCALES) -> list[tuple[list[float], list[float]]]:
        """control_scales() for each of `nets` ControlNets, with its own strength: (N, 2, count)."""
        strengths = self.controlnet_strengths or (self.strength,) * nets
        if len(strengths) != nets:
            raise InputError(f"{len(strengths)} ControlNet strengths for {nets} ControlNets; give one per ControlNet")
        return [self.control_scales(count, s) for s in strengths]

    def replace(self, **changes: object) -> "GenerationConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise InputError(f"{name} must be >= 0, got {value}")


def _network_names(what: str, value: object) -> tuple[str, ...]:
    """`value` as a tuple of network names (duplicates dropped); InputError listing the valid names for
    anything else: a bare string, an empty list, an unknown name."""
    valid = ", ".join(NETWORKS)
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InputError(f"{what} must be a list of network names, got {value!r}; e.g. ('fused_step',) "
                         f"(None: all); valid names: {valid}")
    if not value:
        raise InputError(f"{what} is empty: name at least one network, or give None for all; valid names: {valid}")
    unknown = [name for name in value if name not in NETWORKS]
    if unknown:
        raise InputError(f"unknown network{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
                         f"{what}; valid names: {valid}")
    return tuple(dict.fromkeys(value))


def _check_int(config: GenerationConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")


def check_compile_flags(flags: object) -> tuple[str, ...]:
    """The flags as a sorted tuple without repeats (equal choices give equal keys); an unknown one names the valid."""
    if isinstance(flags, str) or not isinstance(flags, (tuple, list)):
        raise InputError(f"compile_flags must be a list of names, got {flags!r}; valid: {', '.join(COMPILE_FLAGS)}")
    for flag in flags:
        check_choice("compile flag", flag, tuple(COMPILE_FLAGS))
    return tuple(sorted(set(flags)))


@dataclass(frozen=True)
class BackendConfig:
    """Which backend runs the networks, where, and in what precision."""

    backend: str = "torch"  # one of BACKENDS
    device: str = "cpu"  # "cpu" or "cuda[:N]"
    precision: str = "fp32"  # one of PRECISIONS; networks marked fp32-only (CLIP) stay fp32
    cache_dir: str | None = None  # exported ONNX / engines / inductor packages; default $SDCN_TRT_CACHE
    cuda_graph: str = "off"  # one of GRAPH_MODES ("loop" on the CPU runs the same static loop, eagerly)
    check_finite: bool = False  # raise NonFiniteOutputError naming the network that produced NaN/Inf
    max_batch: int | None = None  # most images (photos x samples) per network call; None: no limit on torch and
    # onnxruntime, 1 on tensorrt and inductor (engines built for the contest shape); > 1 builds those for 1..max_batch
    compiled_networks: tuple[str, ...] | None = None  # the networks a built backend (tensorrt, inductor) builds,
    # or the torch backend compiles when `compile` is on; the others run on eager torch at the same device and
    # precision. None: all of them. onnxruntime, and torch without `compile`, ignore it
    compile: str = "off"  # torch backend: torch.compile mode (COMPILE_MODES) of the compiled_networks
    compile_flags: tuple[str, ...] = ()  # inductor settings added to that mode (COMPILE_FLAGS); needs compile on
    compile_scope: str = "whole"  # COMPILE_SCOPES: one graph per network, or its blocks apart (a shorter cold compile)

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, BACKENDS)
        if self.compiled_networks is not None:
            object.__setattr__(self, "compiled_networks", _network_names("compiled_networks", self.compiled_networks))
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            raise InputError(f"max_batch must be an integer >= 1 or None (the backend's default), got {self.max_batch!r}")
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):  # not cudafoo
            raise InputError(f"unknown device {self.device!r}; use 'cpu' or 'cuda[:N]'")
        check_choice("cuda_graph mode", self.cuda_graph, GRAPH_MODES)
        if self.compile in ("reduce-overhead", "max-autotune"):
            raise InputError(f"compile={self.compile!r} captures CUDA graphs of its own, which cannot sit inside the "
                             "loop's; use compile='max-autotune-no-cudagraphs' (or 'default') with cuda_graph='loop', "
                             "which captures the whole loop around the compiled kernels")
        check_choice("compile mode", self.compile, COMPILE_MODES)
        if self.compile != "off" and self.backend != "torch":
            raise InputError(f"compile={self.compile!r} is the torch backend's torch.compile; backend "
                             f"{self.backend!r} " + ("builds AOTInductor packages of its own (compiled_networks "
                             "chooses which)" if self.backend == "inductor" else "compiles nothing with it")
                             + ": use backend='torch' or compile='off'")
        if self.cuda_graph == "step" and not self.device.startswith("cuda"):
            raise InputError("cuda_graph='step' needs device='cuda'")
        object.__setattr__(self, "compile_flags", check_compile_flags(self.compile_flags))
        check_choice("compile_scope", self.compile_scope, COMPILE_SCOPES)
        if self.compile_scope != "whole" and self.compile == "off":
            raise InputError(f"compile_scope={self.compile_scope!r} says what torch.compile compiles; it needs "
                             "compile='default' or 'max-autotune-no-cudagraphs'")
        if self.compile_flags and self.compile == "off":
            raise InputError(f"compile_flags {', '.join(self.compile_flags)} are torch.compile's inductor settings; "
                             "they need compile='default' or 'max-autotune-no-cudagraphs'")

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else cache_root()

    def builds(self, network: str) -> bool:
        """Whether this backend builds `network` (an engine, a package), or runs it on torch instead."""
        return self.backend in BUILT_BACKENDS and (self.compiled_networks is None or network in self.compiled_networks)

    def compiles(self, network: str) -> bool:
        """Whether the torch backend runs `network` through torch.compile (`compile` on, network chosen)."""
        return self.backend == "torch" and self.compile != "off" and (
            self.compiled_networks is None or network in self.compiled_networks)

    @property
    def batch_limit(self) -> int | None:
        """Most images per network call: max_batch, or the backend's default (built engines: 1)."""
        if self.max_batch is not None:
            return self.max_batch
        return 1 if self.backend in BUILT_BACKENDS else None
