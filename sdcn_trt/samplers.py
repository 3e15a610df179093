"""Samplers beyond ldm's DDIM, as data: per step a timestep, an input scale and a linear update.

Every sampler here (DPM-Solver++ 2M, its Karras-sigma variant, UniPC, Euler, Euler ancestral, LCM) is,
step by step, a fixed linear map: the model sees `input_scale * x_i` at `timestep` (possibly fractional),
and the next latent is

    x_{i+1} = sum_k a_k x_{i-k} + sum_k b_k eps_{i-k} + c noise_i      (k = 0 .. history)

with eps the guided noise prediction. The constants are not derived by hand: `sampler_schedule` runs
diffusers' own scheduler class (configured as SD1.5's, or from the model folder's scheduler config)
on coefficient vectors — a latent is represented by its coefficients over the basis {x_0, eps_0..,
noise_0..}; the schedulers' updates are element-wise and linear, so stepping them on those vectors
yields every latent's exact coefficients — and then solves, per step, for the shortest history that
reproduces the next latent. The loop (sdcn_trt.pipeline.loop) applies the result as tensor operations,
so eager, static and graphed loops run every sampler with no host work between steps.

"ddim" is not in this table's machinery: it stays ldm's sampler exactly (sdcn_trt.pipeline.scheduler).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import sys
import threading
import unittest.mock
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from sdcn_trt.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler: diffusers' scheduler class, the fields it sets beyond the base config, a description."""

    scheduler: str  # diffusers class name ("" for ldm's own DDIM)
    options: tuple[tuple[str, Any], ...]  # fields that make the class this sampler, over any model config
    description: str
    stochastic: bool = False  # draws fresh noise every step (from the image's generator)


# the sigma spacings diffusers offers besides the plain one: off unless the sampler is that spacing
_PLAIN_SIGMAS = (("use_karras_sigmas", False), ("use_exponential_sigmas", False), ("use_beta_sigmas", False),
                 ("use_lu_lambdas", False))
_LINEAR = (("thresholding", False), ("clip_sample", False))  # dynamic thresholding and clipping are not linear
_DPMPP_2M = (("algorithm_type", "dpmsolver++"), ("solver_order", 2), *_LINEAR)

SAMPLERS: dict[str, SamplerInfo] = {
    "ddim": SamplerInfo("", (), "ldm's DDIM, exactly as the original ControlNet code (the contest's sampler; eta adds noise)"),
    "dpmpp_2m": SamplerInfo("DPMSolverMultistepScheduler", (*_DPMPP_2M, *_PLAIN_SIGMAS),
                            "DPM-Solver++ (2M): second-order multistep, good at 15-25 steps"),
    "dpmpp_2m_karras": SamplerInfo("DPMSolverMultistepScheduler", (*_DPMPP_2M, *_PLAIN_SIGMAS[1:],
                                                                    ("use_karras_sigmas", True)),
                                   "DPM-Solver++ (2M) on Karras sigmas (the web UIs' 'DPM++ 2M Karras'), 15-25 steps"),
    "unipc": SamplerInfo("UniPCMultistepScheduler", (("solver_order", 2), ("predict_x0", True), *_LINEAR,
                                                     *_PLAIN_SIGMAS),
                         "UniPC: predictor-corrector multistep, good at 10 steps"),
    "euler": SamplerInfo("EulerDiscreteScheduler", _PLAIN_SIGMAS, "Euler: first-order on the sigmas, deterministic"),
    "euler_a": SamplerInfo("EulerAncestralDiscreteScheduler", (),
                           "Euler ancestral: Euler with fresh noise every step (seeded per image)", stochastic=True),
    "lcm": SamplerInfo("LCMScheduler", _LINEAR,
                       "LCM: 4-8 steps at guidance 1-2, for a model with an LCM(-LoRA) merged", stochastic=True),
}
SAMPLER_NAMES = tuple(SAMPLERS)

# SD1.5's scheduler fields where a model ships no scheduler config (presets, single files); every other
# field is the scheduler class's own default
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
}
MAX_HISTORY = 4  # latents and predictions a step may look back on (UniPC needs 2, DPM++ 2M 1)


def check_sampler(name: object) -> str:
    """`name` if it is a sampler, else InputError listing them."""
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)} "
                         f"(`sdcn-trt samplers` describes each)")
    return str(name)


def check_eta(name: str, eta: float) -> None:
    """eta is DDIM's: InputError for eta > 0 with any other sampler."""
    if eta and name != "ddim":
        raise InputError(f"eta={eta} is DDIM's noise knob; sampler {name} has none (euler_a and lcm draw their own "
                         f"noise): leave eta at 0, or use sampler='ddim'")


def describe_samplers() -> str:
    """One line per sampler: name and description (what `sdcn-trt samplers` prints)."""
    width = max(map(len, SAMPLER_NAMES))
    return "\n".join(f"{name:<{width}}  {info.description}" for name, info in SAMPLERS.items())


@dataclass(frozen=True)
class LinearStep:
    """One step of a table sampler (Python floats, baked into the loop as float32 scalars)."""

    timestep: float  # fed to the networks
    input_scale: float  # the model sees input_scale * x (diffusers' scale_model_input)
    x_coefs: tuple[float, ...]  # a_k on x_{i-k}, k = 0 .. history
    eps_coefs: tuple[float, ...]  # b_k on eps_{i-k}
    noise_coef: float  # c on this step's noise draw

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_scale == 1.0 else x * self.input_scale

    def update(self, x: torch.Tensor, eps: torch.Tensor, past: tuple[tuple[torch.Tensor, torch.Tensor], ...],
               noise: torch.Tensor | None) -> torch.Tensor:
        """x_{i+1} from x_i, eps_i, the earlier (x, eps) pairs newest first, and the noise draw."""
        return linear_update(self, x, eps, past, noise)


def linear_update(step: Any, x: torch.Tensor, eps: torch.Tensor, past: tuple[tuple[torch.Tensor, torch.Tensor], ...],
                  noise: torch.Tensor | None) -> torch.Tensor:
    """sum_k a_k x_{i-k} + sum_k b_k eps_{i-k} + c noise, for a LinearStep or its device-scalar twin."""
    out = step.x_coefs[0] * x + step.eps_coefs[0] * eps
    for k, (x_k, eps_k) in enumerate(past, start=1):
        out = out + step.x_coefs[k] * x_k + step.eps_coefs[k] * eps_k
    if noise is not None:
        out = out + step.noise_coef * noise
    return out


@dataclass(frozen=True)
class SamplerSchedule:
    """A table sampler's steps in run order, and what the loop needs around them."""

    name: str
    steps: tuple[LinearStep, ...]
    init_noise_sigma: float  # the start latents are randn * this (diffusers' prepare_latents)
    history: int  # earlier (x, eps) pairs the steps use
    stochastic: bool  # the steps take a noise draw each
    eta: float = 0.0

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def timesteps(self) -> list[float]:
        return [s.timestep for s in self.steps]


def scheduler_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, SAMPLERS[check_sampler(name)].scheduler)


def scheduler_fields(cls: Any) -> set[str]:
    """The configuration fields a diffusers scheduler class accepts."""
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")}


def known_config(name: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The base config a sampler's scheduler is built from: `config` (a model folder's scheduler config)
    restricted to the fields the class accepts, else SD1.5's (log_config_use says what it drops)."""
    fields = scheduler_fields(scheduler_class(name))
    if config is None:
        return {k: v for k, v in SD15_SCHEDULER.items() if k in fields}
    return {k: v for k, v in config.items() if k in fields}


def pinned_options(name: str) -> dict[str, Any]:
    """The fields that make diffusers' class sampler `name`, set over any model config (those the installed
    diffusers knows: an option an older one lacks is its default there)."""
    fields = scheduler_fields(scheduler_class(name))
    return {k: v for k, v in SAMPLERS[name].options if k in fields}


def log_config_use(name: str, config: Mapping[str, Any] | None) -> None:
    """Say what a model folder's scheduler config does not decide: the fields the sampler's class does not
    know (ignored), and the ones the sampler pins to other values (e.g. dpmpp_2m over use_karras_sigmas=true)."""
    if config is None:
        return
    fields = scheduler_fields(scheduler_class(name))
    ignored = sorted(k for k in config if not k.startswith("_") and k not in fields)
    if ignored:
        logger.info("sampler %s: the model's scheduler config fields %s are not %s's; ignored", name,
                    ", ".join(ignored), SAMPLERS[name].scheduler)
    overridden = {k: (config[k], v) for k, v in pinned_options(name).items() if k in config and config[k] != v}
    if overridden:
        logger.info("sampler %s: the model's scheduler config sets %s; the sampler uses %s (they define %s)", name,
                    ", ".join(f"{k}={mine!r}" for k, (mine, _) in overridden.items()),
                    ", ".join(f"{k}={pinned!r}" for k, (_, pinned) in overridden.items()), name)


def read_scheduler_config(model_dir: str | Path) -> dict[str, Any] | None:
    """A diffusers model folder's scheduler/scheduler_config.json, None where it has none."""
    path = Path(model_dir) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the scheduler config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise InputError(f"the scheduler config {path} is not a JSON object")
    return config


def make_scheduler(name: str, config: Mapping[str, Any] | None = None) -> Any:
    """diffusers' scheduler for a table sampler: the base config (known_config) plus the sampler's options."""
    info = SAMPLERS[check_sampler(name)]
    if not info.scheduler:
        raise InputError("ddim is ldm's own sampler (sdcn_trt.pipeline.scheduler), not a diffusers scheduler")
    return scheduler_class(name)(**{**known_config(name, config), **pinned_options(name)})


_PROBE_LOCK = threading.Lock()  # the noise patch below is module-global: one probe at a time


@contextlib.contextmanager
def _noise_from(scheduler: Any, draws: list[torch.Tensor]) -> Iterator[None]:
    """Make the scheduler's module draw its noise from `draws` (one per step) while probing; callers hold
    _PROBE_LOCK."""
    module = sys.modules[type(scheduler).__module__]
    if not hasattr(module, "randn_tensor"):
        yield
        return
    pending = list(draws)

    def draw(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not pending:
            raise RuntimeError(f"{type(scheduler).__name__} drew more than one noise tensor in a step")
        return pending.pop(0)

    with unittest.mock.patch.object(module, "randn_tensor", draw):
        yield


def _probe(name: str, steps: int, config: Mapping[str, Any] | None) -> tuple[list[np.ndarray], list[float],
                                                                             list[float], float, int]:
    """Step diffusers' scheduler on coefficient vectors: (x_0 .. x_S as float64 vectors over the basis
    [x_0, eps_0..eps_{S-1}, noise_0..noise_{S-1}], timesteps, input scales, init_noise_sigma, S)."""
    scheduler = make_scheduler(name, config)
    try:
        scheduler.set_timesteps(steps)
    except ValueError as exc:
        raise InputError(f"sampler {name} cannot run {steps} steps: {exc}") from exc
    count = len(scheduler.timesteps)
    dim = 1 + 2 * count
    basis = torch.eye(dim, dtype=torch.float64).reshape(dim, 1, dim, 1, 1)  # each (1, D, 1, 1): "B, C, H, W"
    x = basis[0]
    xs, timesteps, scales = [x.flatten()], [], []
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(torch.ones_like(x), t)
        if not torch.allclose(scaled, scaled.flatten()[0].expand_as(scaled)):
            raise RuntimeError(f"{SAMPLERS[name].scheduler}.scale_model_input is not a scalar scale")
        scales.append(float(scaled.flatten()[0]))
        timesteps.append(float(t))
        with _noise_from(scheduler, [basis[1 + count + i]]):
            x = scheduler.step(basis[1 + i], t, x, return_dict=True).prev_sample.to(torch.float64)
        xs.append(x.flatten().clone())
    return [v.numpy() for v in xs], timesteps, scales, float(scheduler.init_noise_sigma), count


def _solve_step(xs: list[np.ndarray], i: int, count: int) -> tuple[list[float], list[float], float]:
    """The shortest history (k = 0, 1, ...) whose latents and predictions reproduce x_{i+1} exactly."""
    dim = len(xs[0])
    target = xs[i + 1]

    def unit(j: int) -> np.ndarray:
        v = np.zeros(dim)
        v[j] = 1.0
        return v

    noise = unit(1 + count + i)
    for depth in range(min(i, MAX_HISTORY) + 1):
        columns = ([xs[i - k] for k in range(depth + 1)] + [unit(1 + i - k) for k in range(depth + 1)] + [noise])
        matrix = np.stack(columns, axis=1)
        coefs, *_ = np.linalg.lstsq(matrix, target, rcond=None)
        error = np.abs(matrix @ coefs - target).max()
        if error <= 1e-6 * max(1.0, np.abs(target).max()):
            return (coefs[: depth + 1].tolist(), coefs[depth + 1 : 2 * depth + 2].tolist(), float(coefs[-1]))
    raise RuntimeError(f"step {i} is not a linear map of the last {MAX_HISTORY + 1} latents and predictions")


def _replay(name: str, steps: int, config: Mapping[str, Any] | None, x0: torch.Tensor, eps: torch.Tensor,
            noise: torch.Tensor) -> list[torch.Tensor]:
    """diffusers' own step loop (float32) on given predictions and noise draws: x_1 .. x_S."""
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(steps)
    x, out = x0 * scheduler.init_noise_sigma, []
    for i, t in enumerate(scheduler.timesteps):
        with _noise_from(scheduler, [noise[i]]):
            x = scheduler.step(eps[i], t, x).prev_sample
        out.append(x)
    return out


def _verify(name: str, steps: int, config: Mapping[str, Any] | None, table: SamplerSchedule) -> None:
    """The table against diffusers' own loop on one random trajectory: a scheduler config the probe
    misread (a non-linear option) is refused here, not turned into wrong images."""
    gen = torch.Generator().manual_seed(0)
    x0, eps, noise = (torch.randn(shape, generator=gen) for shape in ((1, 4, 4, 4), (steps, 1, 4, 4, 4),
                                                                        (steps, 1, 4, 4, 4)))
    reference = _replay(name, steps, config, x0, eps, noise)
    x, past = x0 * table.init_noise_sigma, ()
    for i, step in enumerate(table.steps):
        x, past = step.update(x, eps[i], past, noise[i]), ((x, eps[i]), *past)[: table.history]
        error = (x - reference[i]).abs().max().item()
        if not error <= 1e-4 * max(1.0, reference[i].abs().max().item()):
            raise InputError(f"sampler {name} with this scheduler config does not step as a fixed linear map "
                             f"(step {i} differs from {SAMPLERS[name].scheduler}'s by {error:.3g}); a non-linear "
                             f"option in the model's scheduler config? use the sampler without it")


@functools.lru_cache(maxsize=64)
def _cached_schedule(name: str, steps: int, config_json: str | None) -> SamplerSchedule:
    config = None if config_json is None else json.loads(config_json)
    log_config_use(name, config)
    with _PROBE_LOCK:
        try:
            xs, timesteps, scales, sigma, count = _probe(name, steps, config)
            solved = [_solve_step(xs, i, count) for i in range(count)]
        except (RuntimeError, IndexError) as exc:
            raise InputError(f"sampler {name} cannot run {steps} steps with this scheduler config: {exc}") from exc
    train = int((config or SD15_SCHEDULER).get("num_train_timesteps", 1000))
    if timesteps[0] < train / 2:
        raise InputError(f"sampler {name} at {steps} step{'s' if steps > 1 else ''} starts at timestep "
                         f"{timesteps[0]:g}, far from pure noise (diffusers' spacing): its image would be noise; "
                         f"use at least 2 steps")
    history = max(len(a) for a, _, _ in solved) - 1
    table = tuple(
        LinearStep(timestep=t, input_scale=s, x_coefs=tuple(a) + (0.0,) * (history + 1 - len(a)),
                   eps_coefs=tuple(b) + (0.0,) * (history + 1 - len(b)), noise_coef=c if abs(c) > 1e-12 else 0.0)
        for t, s, (a, b, c) in zip(timesteps, scales, solved, strict=True))
    stochastic = any(step.noise_coef != 0.0 for step in table)
    if not all(math.isfinite(v) for step in table for v in (*step.x_coefs, *step.eps_coefs, step.noise_coef)):
        raise InputError(f"sampler {name} at {steps} steps gives non-finite coefficients; choose another step count")
    schedule = SamplerSchedule(name, table, sigma, history, stochastic)
    with _PROBE_LOCK:
        _verify(name, steps, config, schedule)
    return schedule


def sampler_schedule(name: str, steps: int, config: Mapping[str, Any] | None = None) -> SamplerSchedule:
    """The table of sampler `name` (not ddim) at `steps` steps, from diffusers' scheduler configured by
    `config` (None: SD1.5's fields). Cached per (name, steps, config)."""
    check_sampler(name)
    if name == "ddim":
        raise InputError("ddim is ldm's own sampler: make_ddim_schedule builds it")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {steps!r}")
    try:
        key = None if config is None else json.dumps(dict(config), sort_keys=True)
    except TypeError as exc:
        raise InputError(f"the scheduler config holds a value that is not JSON: {exc}") from exc
    return _cached_schedule(name, steps, key)
