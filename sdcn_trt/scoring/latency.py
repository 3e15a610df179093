"""Latency harness: warm-up, CUDA synchronisation, per-call wall time, summary statistics."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, milliseconds) of one call, synchronised before and after, as the contest timed it."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return result, (time.perf_counter() - start) * 1000.0


def summarize(milliseconds: list[float]) -> dict[str, float]:
    """mean / p50 / p90 / min / max of a list of latencies (ms)."""
    if not milliseconds:
        return {"n": 0}
    a = np.asarray(milliseconds, dtype=np.float64)
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "min": float(a.min()), "max": float(a.max())}


def measure(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Latency statistics of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return summarize([timed(fn)[1] for _ in range(repeats)])
