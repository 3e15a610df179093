"""The contest's score formula: score = pd_factor(mean PD) * t_factor(mean latency in ms)."""
from __future__ import annotations

import math

PD_FAIL = 12.0  # an image with PD above this fails


def t_factor(latency_ms: float) -> float:
    """20000 - 28.8462 t below 520 ms; 5000 - 2.40385 (t - 520) below 2600 ms; else 0."""
    t = latency_ms
    if t < 520:
        return 20000 - 28.8462 * t
    if t < 2600:
        return 5000 - 2.40385 * (t - 520)
    return 0.0


def pd_factor(pd: float) -> float:
    """1 - 0.1 p below 4; 0.6 - 0.0125 (p - 4) below 8; 0.55 - 0.1375 (p - 8) up to 12; else 0."""
    p = pd
    if math.isnan(p):
        return 0.0
    if p < 4:
        return 1 - 0.1 * p
    if p < 8:
        return 0.6 - 0.0125 * (p - 4)
    if p <= 12:
        return 0.55 - 0.1375 * (p - 8)
    return 0.0


def contest_score(mean_pd: float, mean_latency_ms: float) -> float:
    return pd_factor(mean_pd) * t_factor(mean_latency_ms)
