import numpy as np
import pytest
import torch

from sdcn_trt import InputError
from sdcn_trt.pipeline import scheduler as s


def test_timesteps_are_ldm_uniform_plus_one():
    assert s.ddim_timesteps(20).tolist() == list(range(1, 1000, 50))
    assert s.ddim_timesteps(7).tolist() == [1, 143, 285, 427, 569, 711, 853, 995]  # 8 steps, as the original
    assert s.ddim_timesteps(1).tolist() == [1]
    assert s.ddim_timesteps(4).tolist() == [1, 251, 501, 751]
    with pytest.raises(InputError, match="ddim_steps=3 is not usable .* would be 1000"):
        s.ddim_timesteps(3)  # 1000 // 3 = 333 -> 0, 333, 666, 999 -> +1 = 1000: the original's IndexError
    for bad in (0, 1001, 2.0, True):
        with pytest.raises(InputError, match="ddim_steps must be an integer in 1..1000"):
            s.ddim_timesteps(bad)


def test_tables_match_an_independent_float64_computation():
    # independent: betas = linspace(sqrt(b0), sqrt(b1))^2 in float64 with numpy, cumprod, then float32
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    acp64 = np.cumprod(1.0 - betas)
    acp32 = s.alphas_cumprod()
    assert acp32.dtype == np.float32
    np.testing.assert_allclose(acp32, acp64, rtol=1e-6)
    for eta in (0.0, 0.5, 1.0):
        sched = s.make_ddim_schedule(20, eta)
        ts = list(range(1, 1000, 50))
        assert sched.timesteps == ts[::-1]
        for k, t in enumerate(ts):
            step = sched.steps[len(ts) - 1 - k]
            a, ap = acp64[t], (acp64[0] if k == 0 else acp64[ts[k - 1]])
            sigma = eta * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
            assert step.alpha == pytest.approx(a, rel=1e-6)
            assert step.alpha_prev == pytest.approx(ap, rel=1e-6)
            assert step.sigma == pytest.approx(sigma, rel=1e-5, abs=1e-9)
            # float32 (1 - a_t) near a_t = 1 loses ~1e-6 relative: the reference has the same rounding
            assert step.sqrt_one_minus_alpha == pytest.approx(np.sqrt(1 - a), rel=1e-5)
            # 1 - a_prev - sigma^2 cancels badly at eta = 1 in float32 (as in the reference)
            assert step.dir_coef == pytest.approx(np.sqrt(1 - ap - sigma**2), rel=1e-4)
    assert s.make_ddim_schedule(20, 0.0).steps[-1].alpha_prev == float(acp32[0])  # alphas_prev[0] = acp[0]


def test_update_equals_the_reference_tensor_formula():
    """The graph-safe update (python-float constants) against p_sample_ddim's (b,1,1,1) tensors."""
    gen = torch.Generator().manual_seed(0)
    x, e, noise = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    for eta in (0.0, 0.7):
        for step in s.make_ddim_schedule(10, eta).steps:
            full = lambda v: torch.full((2, 1, 1, 1), v)  # noqa: E731
            a_t, a_prev, sigma_t = full(step.alpha), full(step.alpha_prev), full(step.sigma)
            sqrt_one_minus_at = full(step.sqrt_one_minus_alpha)
            pred_x0 = (x - sqrt_one_minus_at * e) / a_t.sqrt()
            dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e
            expected = a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * noise
            got = s.ddim_update(x, e, step, noise if eta > 0 else None)
            torch.testing.assert_close(got, expected, rtol=2e-7, atol=2e-6)


def test_cfg_and_bad_eta():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert s.classifier_free_guidance(u, c, 9.0).item() == 19.0
    with pytest.raises(InputError, match="eta must be"):
        s.make_ddim_schedule(10, -0.1)
