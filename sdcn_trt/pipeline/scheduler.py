"""DDIM exactly as ldm's `ddim_hacked` sampler: timesteps, float32 tables, and the update step; `make_schedule`
picks it or a table sampler (sdcn_trt.samplers)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from sdcn_trt.errors import InputError
from sdcn_trt.samplers import SamplerSchedule, check_eta, check_sampler, sampler_schedule

# The scaled-linear schedule of SD1.x (`linear_start`, `linear_end` in cldm_v15.yaml).
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def alphas_cumprod(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> np.ndarray:
    """ldm's `alphas_cumprod` buffer: computed in float64, stored in float32."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return np.cumprod(1.0 - betas.numpy(), axis=0).astype(np.float32)


def ddim_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """ldm's "uniform" discretisation: `range(0, T, T // steps) + 1`, ascending.

    When `steps` does not divide T this yields more than `steps` timesteps (20 -> 20, 7 -> 8),
    exactly as the original sampler does.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise InputError(f"ddim_steps must be an integer in 1..{num_train_timesteps}, got {steps!r}")
    timesteps = np.asarray(list(range(0, num_train_timesteps, num_train_timesteps // steps))) + 1
    if timesteps[-1] >= num_train_timesteps:
        # e.g. 3 steps: 0, 333, 666, 999 -> 1000, past the table; the original sampler raises IndexError
        raise InputError(
            f"ddim_steps={steps} is not usable with ldm's uniform DDIM discretisation: its last timestep would "
            f"be {timesteps[-1]} (the table ends at {num_train_timesteps - 1}); choose another step count"
        )
    return timesteps


@dataclass(frozen=True)
class DdimStep:
    """Constants of one DDIM update (all float32 values, as the reference's (b,1,1,1) tensors)."""

    timestep: int  # model input t
    alpha: float  # a_t
    alpha_prev: float  # a_{t-1}; alphas_prev[0] = alphas_cumprod[0]
    sigma: float  # eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    sqrt_one_minus_alpha: float  # sqrt(1 - a_t), float32
    sqrt_alpha: float  # sqrt(a_t), float32
    sqrt_alpha_prev: float  # sqrt(a_prev), float32
    dir_coef: float  # sqrt(1 - a_prev - sigma**2), float32

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """DDIM feeds the latents as they are."""
        return x

    def update(self, x: torch.Tensor, eps: torch.Tensor, past: tuple[tuple[torch.Tensor, torch.Tensor], ...],
               noise: torch.Tensor | None) -> torch.Tensor:
        """ddim_update (DDIM looks back on nothing: `past` is empty)."""
        return ddim_update(x, eps, self, noise)


@dataclass(frozen=True)
class DdimSchedule:
    """The sampler's steps in the order they run (descending timesteps)."""

    steps: tuple[DdimStep, ...]
    eta: float
    name = "ddim"  # what the loop and reports call the sampler
    init_noise_sigma = 1.0  # the start latents are torch.randn as they are
    history = 0  # earlier (x, eps) pairs a step uses

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def stochastic(self) -> bool:
        """Whether the steps take a noise draw each (eta > 0)."""
        return self.eta > 0

    @property
    def timesteps(self) -> list[int]:
        return [s.timestep for s in self.steps]


def _f32(x: float | np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def make_ddim_schedule(steps: int, eta: float = 0.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DdimSchedule:
    """ldm's make_schedule + make_ddim_sampling_parameters, then reversed into run order.

    The alphas are float32 values of the cumulative product; sigma is computed in float64 from
    them (formula (16) of arXiv:2010.02502) and cast to float32; square roots are float32 as the
    reference's tensor ops take them.
    """
    if not np.isfinite(eta) or eta < 0:
        raise InputError(f"eta must be a finite number >= 0, got {eta}")
    acp = alphas_cumprod(num_train_timesteps)
    ts = ddim_timesteps(steps, num_train_timesteps)
    alphas = acp[ts]  # float32
    alphas_prev = np.asarray([acp[0]] + acp[ts[:-1]].tolist(), dtype=np.float64)
    a64 = alphas.astype(np.float64)
    sigmas = _f32(eta * np.sqrt((1 - alphas_prev) / (1 - a64) * (1 - a64 / alphas_prev)))
    alphas_prev32 = _f32(alphas_prev)
    one = np.float32(1.0)
    room = one - alphas_prev32 - sigmas * sigmas  # under dir_coef's square root: negative -> NaN latents
    if (room < 0).any():  # only for eta > 1: at eta = 1 the room is (1 - a_prev) * a * (1 / a_prev - 1) / (1 - a) >= 0
        largest = float(np.min(np.sqrt((1 - alphas_prev) / ((1 - alphas_prev) / (1 - a64) * (1 - a64 / alphas_prev)))))
        raise InputError(f"eta={eta} is too large for {steps} DDIM steps: the noise it adds exceeds what the "
                         f"step's direction term leaves room for (sqrt(1 - a_prev - sigma^2) of a negative number: NaN "
                         f"images); use eta in 0..{math.floor(largest * 1000) / 1000} (1.0 is DDPM-like, 0 the default)")
    table = []
    for i in range(len(ts)):
        a, ap, sg = alphas[i], alphas_prev32[i], sigmas[i]
        table.append(
            DdimStep(
                timestep=int(ts[i]),
                alpha=float(a),
                alpha_prev=float(ap),
                sigma=float(sg),
                sqrt_one_minus_alpha=float(np.sqrt(one - a)),
                sqrt_alpha=float(np.sqrt(a)),
                sqrt_alpha_prev=float(np.sqrt(ap)),
                dir_coef=float(np.sqrt(one - ap - sg * sg)),
            )
        )
    return DdimSchedule(steps=tuple(reversed(table)), eta=float(eta))


def ddim_update(x: torch.Tensor, eps: torch.Tensor, step: DdimStep, noise: torch.Tensor | None) -> torch.Tensor:
    """One DDIM step x_t -> x_{t-1} with the reference's operation order (float32 scalars).

    pred_x0 = (x - sqrt(1 - a_t) * eps) / sqrt(a_t); x_prev = sqrt(a_prev) * pred_x0
    + sqrt(1 - a_prev - sigma^2) * eps + sigma * noise. Python floats multiply a float32 tensor
    as float32, so this is safe to capture in a CUDA graph with the constants baked in.
    """
    pred_x0 = (x - step.sqrt_one_minus_alpha * eps) / step.sqrt_alpha
    dir_xt = step.dir_coef * eps
    x_prev = step.sqrt_alpha_prev * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + step.sigma * noise
    return x_prev


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """model_uncond + scale * (model_t - model_uncond), as p_sample_ddim combines them."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def make_schedule(sampler: str, steps: int, eta: float = 0.0,
                  scheduler_config: Mapping[str, Any] | None = None) -> DdimSchedule | SamplerSchedule:
    """The steps of `sampler` at `steps` steps: ldm's DDIM (with `eta`) or a table sampler built from
    diffusers' scheduler (configured from `scheduler_config`, a model folder's, else SD1.5's)."""
    check_sampler(sampler)
    if sampler == "ddim":
        return make_ddim_schedule(steps, eta)
    check_eta(sampler, eta)
    return sampler_schedule(sampler, steps, scheduler_config)
