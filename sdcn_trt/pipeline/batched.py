"""Many photos per network call: batch items, list arguments broadcast to items, groups of one size.

A batch call runs B photos (different edge maps, prompts and seeds, one GenerationConfig) through
the same loop a single call runs, with every per-image tensor concatenated along the batch axis:
latents, controls and eta noise item after item, the text as [negatives..., positives...] halves
(the CFG layout the loop splits with `chunk(2)`). Photos whose preprocessed sizes differ cannot
share a call: `group_by_size` splits them, keeping each item's index so results return in input order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from sdcn_trt.config import BackendConfig
from sdcn_trt.errors import DeviceMemoryError, InputError

logger = logging.getLogger(__name__)


@dataclass
class BatchItem:
    """One photo of a batch and what may differ between photos of one call; None takes the config's value."""

    image: np.ndarray  # uint8 photo (HW, HWC; gray, RGB/BGR or RGBA), or a ready control map with control_image
    prompt: str | None = None  # None: config.prompt
    n_prompt: str | None = None  # None: config.n_prompt
    seed: int | None = None  # None: config.seed (-1 draws one at random)
    generator: torch.Generator | None = None  # draws this item's latents and eta noise; overrides `seed`


@dataclass
class Prepared:
    """A batch item after preprocessing: its control maps and the prompts and seed it runs with."""

    index: int  # position in the caller's list
    detected: np.ndarray  # uint8 HxWx3 edge map (or the given control map)
    maps: list[np.ndarray]  # one uint8 HxWx3 control map per ControlNet
    positive: str
    negative: str
    seed: int
    generator: torch.Generator
    start: torch.Tensor  # the generator's state before this item's draws: a call split on GPU memory draws again

    def draw(self, latent_shape: tuple[int, ...], steps: int, noisy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """draw_noise from the generator's state when the item was prepared (the same draws on a retry)."""
        self.generator.set_state(self.start)
        return draw_noise(self.generator, latent_shape, steps, noisy)

    @property
    def size(self) -> tuple[int, int]:
        return self.detected.shape[0], self.detected.shape[1]


def is_list(value: Any) -> bool:
    """A list or tuple of per-photo values (a numpy array is one image, a string one prompt)."""
    return isinstance(value, (list, tuple))


def broadcast(**named: Any) -> list[dict[str, Any]]:
    """Per-item argument dicts from list arguments of one length and single values repeated.

    InputError for an empty list and for lists of different lengths (naming each list's length)."""
    lengths = {name: len(value) for name, value in named.items() if is_list(value)}
    for name, length in lengths.items():
        if length == 0:
            raise InputError(f"{name} is an empty list; give at least one value (or a single value)")
    if len(set(lengths.values())) > 1:
        raise InputError("list arguments must have one length (a single value is used for every photo), got "
                         + ", ".join(f"{name}: {length}" for name, length in lengths.items()))
    count = next(iter(lengths.values()), 1)
    return [{name: value[i] if is_list(value) else value for name, value in named.items()} for i in range(count)]


def photos_per_call(batch_size: int | None, backend: BackendConfig, num_samples: int) -> int | None:
    """Photos per call: `batch_size` (None: all of a size), capped by the backend's max_batch, which counts
    images (photos x samples)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be an integer >= 1 (or None: as many as fit), got {batch_size!r}")
    engines = backend.batch_limit
    if engines is None:
        return batch_size
    cap = max(1, engines // num_samples)
    if batch_size is not None and batch_size > cap:
        logger.info("%s engines take %d images per call (BackendConfig.max_batch): batches of %d photos x %d "
                    "samples run as calls of %d", backend.backend, engines, batch_size, num_samples, cap)
    return cap if batch_size is None else min(batch_size, cap)


def group_by_size(items: Sequence[Prepared], limit: int | None) -> list[list[Prepared]]:
    """Calls to make: items of one preprocessed size together, in input order within a size, at most
    `limit` per call (None: no limit); sizes in the order they first appear."""
    if limit is not None and limit < 1:
        raise InputError(f"batch size must be >= 1, got {limit}")
    by_size: dict[tuple[int, int], list[Prepared]] = {}
    for item in items:
        by_size.setdefault(item.size, []).append(item)
    calls = []
    for group in by_size.values():
        step = limit or len(group)
        calls += [group[i : i + step] for i in range(0, len(group), step)]
    return calls


def stack_text(pairs: Sequence[torch.Tensor], num_samples: int) -> torch.Tensor:
    """Per item (2, 77, D) [negative, positive] -> (2 * B * S, 77, D): [negatives..., positives...],
    each item's row repeated per sample, the layout the loop's classifier-free guidance splits in halves."""
    negatives = [p[0:1].expand(num_samples, -1, -1) for p in pairs]  # (S, 77, D) each
    positives = [p[1:2].expand(num_samples, -1, -1) for p in pairs]
    return torch.cat(negatives + positives).contiguous()  # (2BS, 77, D)


def draw_noise(generator: torch.Generator, latent_shape: tuple[int, ...], steps: int,
               noisy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One item's initial latents (S, 4, h, w), then its per-step noise (steps, S, 4, h, w) when the sampler
    takes some (DDIM with eta > 0, euler_a, lcm), drawn from its own generator in the reference's order
    (latents first, then one draw per step): an image's noise is its own, alone or in a batch."""
    latents = torch.randn(latent_shape, generator=generator)
    noise = torch.stack([torch.randn(latent_shape, generator=generator) for _ in range(steps)]) if noisy else None
    return latents, noise


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU out-of-memory error, from torch or raised by a backend as DeviceMemoryError."""
    return isinstance(exc, (torch.OutOfMemoryError, DeviceMemoryError))
