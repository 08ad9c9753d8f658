"""Proof f: a committed Γ vector → σ² table, checked against mpmath at 50 digits.

The truth here is written from the paper's formulas independently of the code
under test: cosine betas from ᾱ(t) directly, the DDPM family in its reduced
form σ² = (β_{t|s}/α_{t|s})(1 − β_{t|s}Γ_t/β̄_t) (Eq. 15-style, no λ²/γ² split),
and the DDIM family from Eq. 9 with the Theorem 2 clip applied by hand.
"""

from __future__ import annotations

import json
import pathlib

import mpmath as mp
import numpy as np
import pytest

from adpm_dist.diffusion.analytic import isotonic_increasing, step_variances
from adpm_dist.diffusion.schedule import make_schedule

mp.mp.dps = 50
DATA = pathlib.Path(__file__).parent / "data" / "gamma_fixed_cosine20.json"


def mp_cosine_abar(n_steps: int):
    s = mp.mpf("0.008")

    def f(t):
        return mp.cos((mp.mpf(t) / n_steps + s) / (1 + s) * mp.pi / 2) ** 2

    abar = [mp.mpf(1)]
    for t in range(1, n_steps + 1):
        beta = min(1 - f(t) / f(t - 1), mp.mpf("0.999"))
        abar.append(abar[-1] * (1 - beta))
    return abar


def truth_table(gamma, tau, method, eta=0.0, clip_pixel=None):
    abar = mp_cosine_abar(20)
    rows = []
    for s, t in reversed(list(zip(tau[:-1], tau[1:]))):
        a_s, a_t = abar[s], abar[t]
        b_s, b_t = 1 - a_s, 1 - a_t
        a_ts = a_t / a_s
        b_ts = 1 - a_ts
        g = mp.mpf(gamma[t - 1])
        cov = min(max(b_t / a_t * (1 - g), mp.mpf(0)), mp.mpf(1))  # Theorem 2 for [−1, 1]
        tilde = b_s * b_ts / b_t
        if method == "ddpm-beta":
            v = b_ts
        elif method == "ddpm-tilde":
            v = tilde
        elif method == "analytic-ddpm":
            g_eff = 1 - cov * a_t / b_t  # the Γ that the clip leaves
            v = b_ts / a_ts * (1 - b_ts * g_eff / b_t)
        else:
            lam2 = mp.mpf(eta) ** 2 * tilde
            if method == "ddim":
                v = lam2
            else:
                gam = mp.sqrt(a_s) - mp.sqrt((b_s - lam2) * a_t / b_t)
                v = lam2 + gam**2 * cov
        if clip_pixel is not None and s == 1:
            v = min(v, (mp.mpf(clip_pixel) * 2 / 255 * mp.sqrt(mp.pi / 2)) ** 2)
        rows.append((s, t, v))
    return rows


@pytest.fixture(scope="module")
def fixed():
    obj = json.loads(DATA.read_text())
    return np.asarray(obj["gamma"], dtype=np.float64)


def test_cosine_betas_match_mpmath():
    sched = make_schedule("cosine", 20)
    abar = mp_cosine_abar(20)
    for n in range(21):
        assert float(abar[n]) == pytest.approx(sched.alphas_cumprod[n], rel=1e-13)


@pytest.mark.parametrize(
    "method,eta,clip_pixel",
    [
        ("ddpm-beta", 0.0, None),
        ("ddpm-beta", 0.0, 1.0),
        ("ddpm-tilde", 0.0, None),
        ("ddpm-tilde", 0.0, 0.5),
        ("analytic-ddpm", 0.0, None),
        ("analytic-ddpm", 0.0, 1.0),
        ("ddim", 0.5, None),
        ("analytic-ddim", 0.0, None),
        ("analytic-ddim", 0.7, None),
        ("analytic-ddim", 1.0, 2.0),
    ],
)
@pytest.mark.parametrize("tau", [[1, 5, 10, 15, 20], [1, 2, 3, 7, 18, 19, 20], list(range(1, 21))])
def test_f_sigma2_table_matches_independent_derivation(fixed, method, eta, clip_pixel, tau):
    sched = make_schedule("cosine", 20)
    got = step_variances(sched, tau, method, gamma=fixed, eta=eta, clip_pixel=clip_pixel, fit="clip")
    want = truth_table(fixed, tau, method, eta, clip_pixel)
    assert [(int(s), int(t)) for s, t in zip(got.s, got.t)] == [(s, t) for s, t, _ in want]
    np.testing.assert_allclose(got.sigma2, [float(v) for _, _, v in want], rtol=1e-11, atol=0)


def test_f_the_fixed_vector_exercises_both_clips(fixed):
    abar = mp_cosine_abar(20)
    raw = [float((1 - abar[t]) / abar[t] * (1 - mp.mpf(fixed[t - 1]))) for t in range(1, 21)]
    assert min(raw) < 0 and max(raw) > 1


def test_isotonic_fit_matches_scikit_learn():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 100, 1000):
        y = np.cumsum(rng.normal(0.01, 1.0, size))
        want = IsotonicRegression().fit_transform(np.arange(size), y)
        np.testing.assert_allclose(isotonic_increasing(y), want, rtol=1e-12, atol=1e-12)


def test_monotone_projection_is_a_no_op_for_a_feasible_gamma():
    sched = make_schedule("linear", 200)
    abar, bbar = sched.alphas_cumprod[1:], sched.bar_betas[1:]
    cov = 0.3 * bbar / (0.3 * abar + bbar)  # a single Gaussian's, increasing in t
    gamma = 1 - cov * abar / bbar
    tau = [1, 20, 50, 120, 200]
    a = step_variances(sched, tau, "analytic-ddpm", gamma=gamma, fit="isotonic").sigma2
    b = step_variances(sched, tau, "analytic-ddpm", gamma=gamma, fit="clip").sigma2
    np.testing.assert_allclose(a, b, rtol=1e-12)
