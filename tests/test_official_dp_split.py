"""The optimal trajectory on an infeasible Γ (issue 23): the official split and a feasible DP cost.

Independent truth, NumPy only: for Gaussian data x₀ ~ N(0, diag v) the optimal ε-predictor is
linear, Γ_t = mean_i β̄_t/(ᾱ_t v_i + β̄_t), the posterior mean is exact and the posterior variance
per dimension is c_i(t) = v_i β̄_t/(ᾱ_t v_i + β̄_t); each step's expected KL is then closed form:
½ Σ_i [β̃/σ² − 1 + log(σ²/β̃) + γ² c_i(t)/σ²] (γ² = ᾱ_s β_{t|s}²/β̄_t²). The official code's
``_dp_seg`` (baofff/Analytic-DPM, cifar_imagenet_codes/core/inference/utils.py: ``_split``,
``_get_fn_m``, ``_solve_fn_dp``) is re-written below from its definition, loops and all.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from adpm_dist.diffusion.analytic import COVARIANCE_FITS, step_variances
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.diffusion.trajectory import even_trajectory, make_trajectory


# ------------------------------------------------------------------ the official code, re-written
def official_split(ms_eps, n, k):
    first_bad = n + 1
    for i in range(1, n + 1):
        if ms_eps[i] > 1:
            first_bad = i
            break
    num_bad = 2 * (n - first_bad + 1)
    n1 = n - num_bad
    k1 = math.ceil((1.0 - 0.8 * num_bad / n) * k)
    k2 = k - k1
    if k1 > n1:
        k1, k2 = n1, k - n1
    if k2 > num_bad:
        k2, k1 = num_bad, k - num_bad
    if num_bad > 0 and k2 == 0:
        k2, k1 = 1, k - 1
    return k1, n1, k2, num_bad


def official_dp(cost, n, k):
    if n == k:
        return list(range(1, n + 1))
    c = np.full((k + 1, n + 1), np.inf)
    d = np.full((k + 1, n + 1), -1)
    c[2, 2:n] = cost[1, 2:n]
    d[2, 2:n] = 1
    for j in range(3, k + 1):
        tmp = c[j - 1, :].reshape(n + 1, 1) + cost[: n + 1, : n + 1]
        c[j, j:] = np.min(tmp, axis=0)[j:]
        d[j, j:] = np.argmin(tmp, axis=0)[j:]
    out, i, j = [n], n, k
    while j > 2:
        i = d[j, i]
        out.append(int(i))
        j -= 1
    return [1] + out[::-1]


def official_dp_seg(ms_eps, betas0, n, k):
    """``betas0``: β with a leading 0 (the official layout); ``ms_eps`` length N+1."""
    k1, n1, k2, _ = official_split(ms_eps, n, k)
    alphas = 1.0 - betas0
    ms_score = np.zeros_like(ms_eps)
    ms_score[1:] = ms_eps[1:] / (1.0 - alphas.cumprod()[1:])
    cost = np.full((n1 + 1, n1 + 1), np.inf)
    for s in range(1, n1 + 1):
        skip_betas = 1.0 - alphas[s + 1: n1 + 1].cumprod()
        cost[s, s + 1: n1 + 1] = np.log(1.0 - skip_betas * ms_score[s + 1: n1 + 1])
    steps1 = official_dp(cost, n1, k1)
    steps2 = [round(n - (n - n1) / k2 * i) for i in range(k2)][::-1] if k2 > 0 else []
    return np.asarray(steps1 + steps2)


# ------------------------------------------------------------------ Gaussian data: exact truth
N, D, K = 1000, 3072, 10


def make_case():
    sched = make_schedule("linear", N)
    v = np.exp(np.random.default_rng(0).uniform(math.log(1e-4), math.log(0.5), D))
    abar, bbar = sched.alphas_cumprod[1:, None], sched.bar_betas[1:, None]
    exact = np.concatenate([[np.nan], np.mean(bbar / (abar * v + bbar), axis=1)])
    post_var = np.concatenate([np.zeros((1, D)), v * bbar / (abar * v + bbar)])  # c_i(t), row t
    noisy = exact.copy()
    noisy[901:] += 2e-5  # Monte-Carlo error at large t: Γ_t > 1 for t near N
    return sched, v, exact, noisy, post_var


@pytest.fixture(scope="module")
def case():
    return make_case()


def exact_nelbo_bpd(sched, v, post_var, tau, sigma2_steps) -> float:
    """Prior KL + Σ step KLs in bits/dim (the decoder term depends on τ_1 = 1 only: left out)."""
    abar, bbar = sched.alphas_cumprod, sched.bar_betas
    total = 0.5 * np.mean(bbar[N] + abar[N] * v - 1.0 - math.log(bbar[N]))
    for s, t, sig2 in zip(sigma2_steps.s, sigma2_steps.t, sigma2_steps.sigma2):
        beta_ts = 1.0 - abar[t] / abar[s]
        tilde = bbar[s] * beta_ts / bbar[t]
        gam2 = abar[s] * beta_ts**2 / bbar[t] ** 2
        total += 0.5 * np.mean(tilde / sig2 - 1.0 + math.log(sig2 / tilde) + gam2 * post_var[t] / sig2)
    return float(total / math.log(2.0))


def nelbo(case, tau, fit):
    sched, v, _, noisy, post_var = case
    var = step_variances(sched, tau, "analytic-ddpm", gamma=noisy, fit=fit)
    return exact_nelbo_bpd(sched, v, post_var, tau, var)


def test_official_split_is_the_official_codes_trajectory(case):
    sched, _, exact, noisy, _ = case
    betas0 = sched.betas  # leading 0, as the official code has it
    for gamma in (noisy, exact):
        for k in (3, 10, 25, 100):
            want = official_dp_seg(np.nan_to_num(gamma), betas0, N, k)
            got = make_trajectory("optimal", sched, k, gamma=gamma, cost="official")
            assert got.tolist() == want.tolist(), (k, got[:5], want[:5])
    assert make_trajectory("optimal", sched, 2, gamma=noisy, cost="official").tolist() == [1, N]


@pytest.mark.parametrize("fit", COVARIANCE_FITS)
def test_no_fit_jumps_over_the_timeline_on_an_infeasible_gamma(case, fit):
    sched, v, _, noisy, post_var = case
    assert np.nanmax(noisy) > 1.0  # the case is infeasible
    betas0 = sched.betas  # leading 0, as the official code has it
    seg = official_dp_seg(noisy, betas0, N, K)
    best = min(nelbo(case, even_trajectory(N, K), fit), nelbo(case, seg, fit))
    tau = make_trajectory("optimal", sched, K, gamma=noisy, fit=fit)
    assert nelbo(case, tau, fit) <= best + 0.01, (fit, tau.tolist())
    official = make_trajectory("optimal", sched, K, gamma=noisy, fit=fit, cost="official")
    assert official.tolist() == seg.tolist()
