"""The per-pair model-error statistics (adpm_dist.gamma.moments.pair_errors) against their
definitions computed with NumPy and SciPy only: x̂₀ = (x_t − √β̄_t ε̂)/√ᾱ_t literally, the clamp
to [−1, 1], the decoder as normal-cdf differences over 8-bit bins with open edge bins
(tests/oracle_truth.py)."""

from __future__ import annotations

import numpy as np
import torch

from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.gamma.moments import pair_errors
from tests.oracle_truth import abar_from_betas, decoder_nll_scipy


def test_pair_statistics_match_their_definitions():
    n_steps, d, rows = 10, 6, 64
    sched = make_schedule("linear", n_steps)
    abar = abar_from_betas(np.linspace(1e-4, 0.02, n_steps))  # independent of the schedule code
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (rows, d))
    pixels[:8] = 255  # on the edges, where the clamp binds and the decoder's edge bins are open
    pixels[8:16] = 0
    x0 = pixels / 127.5 - 1.0
    t = np.array([1, 2, 5, 10] * (rows // 4))
    eps_true = rng.normal(size=(rows, d))
    eps_hat = 0.8 * eps_true + rng.normal(0, 0.7, (rows, d))  # a network with an error
    a_t, b_t = abar[t][:, None], 1.0 - abar[t][:, None]
    x_t = np.sqrt(a_t) * x0 + np.sqrt(b_t) * eps_true
    raw = (x_t - np.sqrt(b_t) * eps_hat) / np.sqrt(a_t)
    clamped = np.clip(raw, -1.0, 1.0)
    e = eps_true - eps_hat
    want = {"a": ((x0 - clamped) ** 2).mean(1), "a_raw": ((x0 - raw) ** 2).mean(1),
            "b": ((x0 - clamped) * e).mean(1), "b_raw": ((x0 - raw) * e).mean(1), "c": (e**2).mean(1),
            "x0_sq": (x0**2).mean(1)}
    assert np.any(want["a"] < want["a_raw"] * 0.99)  # the clamp binds for some rows
    dec_var = (1 - abar[1]) * (1 - abar[2] / abar[1]) / (1 - abar[2])
    first = t == 1
    want["decoder_nll"] = np.where(first, 0.0, np.nan)
    want["decoder_nll_raw"] = want["decoder_nll"].copy()
    want["decoder_nll"][first] = decoder_nll_scipy(x0[first], clamped[first], dec_var).sum(1) / d
    want["decoder_nll_raw"][first] = decoder_nll_scipy(x0[first], raw[first], dec_var).sum(1) / d

    shape = (rows, 1, 2, 3)  # images: the statistics are per dimension of the flattened sample
    got = pair_errors(sched, torch.tensor(x0, dtype=torch.float32).reshape(shape), torch.tensor(t),
                      torch.tensor(eps_true, dtype=torch.float32).reshape(shape),
                      torch.tensor(eps_hat, dtype=torch.float32).reshape(shape))
    assert set(got) == set(want)
    for key, value in want.items():  # inputs in float32 (as the job has them), arithmetic in float64
        assert got[key].dtype == np.float64 and got[key].shape == (rows,), key
        np.testing.assert_array_equal(np.isnan(got[key]), np.isnan(value), err_msg=key)
        np.testing.assert_allclose(got[key], value, rtol=2e-6, atol=2e-7, err_msg=key)


def test_float64_inputs_give_the_definitions_to_float64_rounding():
    sched = make_schedule("linear", 1000)
    abar = abar_from_betas(np.linspace(1e-4, 0.02, 1000))
    rng = np.random.default_rng(1)
    x0 = rng.integers(0, 256, (40, 5)) / 127.5 - 1.0
    t = np.array([1, 3, 500, 1000] * 10)
    eps, eps_hat = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    got = pair_errors(sched, *(torch.tensor(v) for v in (x0, t, eps, eps_hat)))
    r2 = (1 - abar[t]) / abar[t]
    c = ((eps - eps_hat) ** 2).mean(1)
    np.testing.assert_allclose(got["c"], c, rtol=1e-13)
    # unclipped, x₀ − x̂₀ = √(β̄/ᾱ)(ε̂ − ε): a_raw = (β̄/ᾱ) c and b_raw = −√(β̄/ᾱ) c, even at t = N
    np.testing.assert_allclose(got["a_raw"], r2 * c, rtol=1e-12)
    np.testing.assert_allclose(got["b_raw"], -np.sqrt(r2) * c, rtol=1e-12)
    assert np.all(got["a"][t == 1000] <= 4.0) and np.all(got["a_raw"][t == 1000] > 100)


def test_scalar_counts_follow_the_pairs():
    from adpm_dist.gamma import GammaFile

    sched = make_schedule("linear", 10)
    gf = GammaFile.empty(sched, {"digest": "x"}, moments=True)
    x = torch.zeros(4, 2, dtype=torch.float64)
    t = torch.tensor([1, 2, 1, 10])
    gf.add(t.numpy(), np.ones(4), pair_errors(sched, x, t, x + 0.01, x))
    counts = dict(zip(("x0_sq", "decoder_nll", "decoder_nll_raw"), gf.moments.scalars[:, 2].tolist()))
    assert counts == {"x0_sq": 4, "decoder_nll": 2, "decoder_nll_raw": 2}
