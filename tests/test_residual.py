"""The model-error maths of diffusion/residual.py against independent truth.

- the mean-error formulas (DDPM, both DDIM directions) are exact identities on any
  sample: checked on Monte-Carlo draws of an imperfect, clipped model, with the
  means formed by the samplers' own ``reverse_mean``;
- σ*² = λ² + m against a numerical minimiser of the expected step KL;
- for the exact ε* of Gaussian data, residual-ddpm is Analytic-DPM exactly;
- for an imperfect model, residual-ddpm's predicted NELBO ≤ analytic-ddpm's at every K;
- the predicted NELBO against the Monte-Carlo NELBO of ``likelihood.negative_elbos``;
- the expected-cost DP against brute force over every trajectory of a small chain.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from adpm_dist.diffusion.analytic import covariance_estimate, step_variances
from adpm_dist.diffusion.likelihood import negative_elbos
from adpm_dist.diffusion.residual import (
    DDPM_RULES,
    ErrorMoments,
    expected_cost_matrix,
    expected_step_kl,
    kl_optimal_variance,
    mean_error,
    predicted_nelbo,
    step_coefficients,
)
from adpm_dist.diffusion.samplers import make_generators, predict_x0, reverse_mean
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.diffusion.trajectory import even_trajectory, least_cost_path, path_cost


def _moments_at(n: int, t: int, a: float, b: float, c: float) -> ErrorMoments:
    vec = [np.full(n + 1, np.nan) for _ in range(3)]
    for v, x in zip(vec, (a, b, c)):
        v[t] = x
    return ErrorMoments(*vec)


@pytest.mark.parametrize("s,t,eta", [(0, 7, 0.0), (3, 10, 0.5), (12, 30, 1.0), (1, 49, 0.2)])
def test_mean_error_is_an_identity_on_any_sample(s, t, eta):
    sched = make_schedule("linear", 50)
    g = torch.Generator().manual_seed(t)
    d, m = 24, 4000
    x0 = torch.rand(m, d, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(m, d, generator=g, dtype=torch.float64)
    abar_t = float(sched.alphas_cumprod[t])
    x_t = math.sqrt(abar_t) * x0 + math.sqrt(1 - abar_t) * eps
    eps_hat = 0.7 * eps + 0.2 * x_t + 0.05  # an imperfect model (any function works)
    x0c = predict_x0(sched, x_t, eps_hat, t).clamp(-1, 1)
    a = float(((x0 - x0c) ** 2).mean())
    b = float(((x0 - x0c) * (eps - eps_hat)).mean())
    c = float(((eps - eps_hat) ** 2).mean())
    mom = _moments_at(50, t, a, b, c)
    tilde = float(step_coefficients(sched, s, t)["tilde"]) if s > 0 else 0.0

    def msq(u, v) -> float:
        return float(((u - v) ** 2).mean())

    # DDPM: μ̃(x_t, x₀) vs μ̃(x_t, x̂₀ᶜ)
    got = mean_error(sched, [s], [t], mom, "ddpm")[0]
    want = msq(reverse_mean(sched, x_t, x0, s, t, tilde), reverse_mean(sched, x_t, x0c, s, t, tilde))
    assert got == pytest.approx(want, rel=1e-10, abs=1e-14)
    # DDIM, direction re-derived from x̂₀ᶜ (the sampler's today)
    lam2 = eta**2 * tilde
    got = mean_error(sched, [s], [t], mom, "ddim", [lam2], "x0")[0]
    want = msq(reverse_mean(sched, x_t, x0, s, t, lam2), reverse_mean(sched, x_t, x0c, s, t, lam2))
    assert got == pytest.approx(want, rel=1e-10, abs=1e-14)
    # DDIM, direction = the network's ε̂ (official code)
    coef = math.sqrt(max(1 - float(sched.alphas_cumprod[s]) - lam2, 0.0))
    mu_net = math.sqrt(float(sched.alphas_cumprod[s])) * x0c + coef * eps_hat
    got = mean_error(sched, [s], [t], mom, "ddim", [lam2], "network")[0]
    assert got == pytest.approx(msq(reverse_mean(sched, x_t, x0, s, t, lam2), mu_net), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("lam2,m", [(1e-4, 3e-3), (0.02, 1e-5), (0.3, 0.7), (1e-6, 1e-6)])
def test_kl_optimal_variance_is_the_numerical_minimiser(lam2, m):
    res = minimize_scalar(lambda u: float(expected_step_kl(lam2, math.exp(u), m)),
                          bounds=(math.log(lam2) - 5, math.log(lam2 + m) + 5), method="bounded",
                          options={"xatol": 1e-12})
    assert float(kl_optimal_variance(lam2, m)) == pytest.approx(math.exp(res.x), rel=1e-6)
    # and there the KL is ½ log(σ*²/λ²)
    at_optimum = float(expected_step_kl(lam2, lam2 + m, m))
    assert at_optimum == pytest.approx(0.5 * math.log(1 + m / lam2), rel=1e-12)


def _gaussian_truth(sched, scale: float, k: float = 1.0):
    """Data N(0, scale² I), model ε̂ = k·ε*: Γ_t, A_t (no clipping), E‖x₀‖²/d."""
    abar, bbar = sched.alphas_cumprod[1:], sched.bar_betas[1:]
    gain = np.sqrt(bbar) / (abar * scale**2 + bbar)  # ε* = gain · x_t
    gamma = np.concatenate([[np.nan], gain**2 * (abar * scale**2 + bbar)])
    h = 1 - np.sqrt(bbar) * k * gain  # x̂₀ = h x_t/√ᾱ
    a = np.concatenate([[0.0], scale**2 * (1 - h) ** 2 + (bbar / abar) * h**2])
    nan = np.full_like(a, np.nan)
    return gamma, ErrorMoments(a, nan, nan, x0_sq=scale**2, decoder_nll=0.0)


@pytest.mark.parametrize("k", [2, 10, 100, 1000])
def test_exact_model_residual_equals_analytic(k):
    sched = make_schedule("linear", 1000)
    gamma, mom = _gaussian_truth(sched, 0.5)
    tau = even_trajectory(1000, k)
    res = step_variances(sched, tau, "residual-ddpm", moments=mom)
    ana = step_variances(sched, tau, "analytic-ddpm", gamma=gamma)
    np.testing.assert_allclose(res.sigma2, ana.sigma2, rtol=1e-9)


@pytest.mark.parametrize("k", [2, 5, 10, 50, 100, 1000])
def test_residual_nelbo_not_worse_than_analytic_for_an_imperfect_model(k):
    sched = make_schedule("linear", 1000)
    gamma, _ = _gaussian_truth(sched, 0.5)
    _, mom = _gaussian_truth(sched, 0.5, k=0.8)  # Γ of the optimum, A of a worse model
    tau = even_trajectory(1000, k)
    bits = {}
    for method in ("analytic-ddpm", "residual-ddpm"):
        v = step_variances(sched, tau, method, gamma=gamma, moments=mom)
        bits[method] = predicted_nelbo(sched, v.s, v.t, v.lambda2, v.sigma2, mom)[0]
    assert bits["residual-ddpm"] <= bits["analytic-ddpm"] + 1e-12
    assert bits["residual-ddpm"] < bits["analytic-ddpm"] - 1e-9  # strictly better here


@pytest.mark.slow
def test_predicted_nelbo_agrees_with_monte_carlo():
    sched = make_schedule("linear", 100)
    scale, k_model = 0.5, 0.9
    gamma, mom = _gaussian_truth(sched, scale, k=k_model)
    abar, bbar = sched.alphas_cumprod, sched.bar_betas

    def eps_fn(x_t, n):  # ε̂ = k·ε*, the model whose A_t is known in closed form
        t = n.numpy()
        gain = torch.as_tensor(np.sqrt(bbar[t]) / (abar[t] * scale**2 + bbar[t])).reshape(-1, 1)
        return k_model * gain * x_t

    count, d = 20000, 4
    x0 = scale * torch.randn(count, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tau = even_trajectory(100, 10)
    methods = ("ddpm-beta", "ddpm-tilde", "analytic-ddpm", "residual-ddpm")
    terms = negative_elbos(eps_fn, sched, tau, methods, x0, make_generators(range(count)), gamma=gamma,
                           moments=mom)
    for method in methods:
        nats = (terms[method]["total"] - terms[method]["decoder"]) / d  # the decoder is data-specific
        dec = terms[method]["decoder"] / d
        mom_m = ErrorMoments(mom.a, mom.b, mom.c, x0_sq=float((x0**2).mean()), decoder_nll=float(dec.mean()),
                             decoder_nll_stderr=float(dec.std() / math.sqrt(count)))
        v = step_variances(sched, tau, method, gamma=gamma, moments=mom)
        bits, se = predicted_nelbo(sched, v.s, v.t, v.lambda2, v.sigma2, mom_m)
        mc_bits = float((nats + dec).mean()) / math.log(2)
        mc_se = float(nats.std()) / math.sqrt(count) / math.log(2)
        assert abs(bits - mc_bits) < 4 * math.hypot(se, mc_se), (method, bits, mc_bits, se, mc_se)


@pytest.mark.parametrize("method", DDPM_RULES)
def test_expected_cost_dp_matches_brute_force(method):
    n, k = 12, 4
    sched = make_schedule("cosine", n)
    gamma, mom = _gaussian_truth(sched, 0.5, k=0.9)
    mom = ErrorMoments(mom.a, np.zeros(n + 1), np.zeros(n + 1), x0_sq=0.25, decoder_nll=0.1)
    cov = covariance_estimate(sched, gamma)
    cost = expected_cost_matrix(sched, method, mom, cov=cov)
    best, best_bits, bits_of = None, math.inf, {}
    for inner in itertools.combinations(range(2, n), k - 2):
        tau = np.array([1, *inner, n])
        v = step_variances(sched, tau, method, gamma=gamma, moments=mom)
        bits = predicted_nelbo(sched, v.s, v.t, v.lambda2, v.sigma2, mom)[0]
        bits_of[tuple(tau)] = bits
        if bits < best_bits - 1e-12:
            best, best_bits = tau, bits
    dp = least_cost_path(cost, k)
    np.testing.assert_array_equal(dp, best)
    # the matrix's path cost is the NELBO up to the trajectory-free prior and decoder terms
    offsets = {round(b * math.log(2) * 1.0 - path_cost(cost, t), 9) for t, b in bits_of.items()}
    assert len(offsets) == 1


def test_optimal_trajectory_switches_cost():
    n = 40
    sched = make_schedule("linear", n)
    gamma, mom = _gaussian_truth(sched, 0.5, k=0.8)
    from adpm_dist.diffusion.trajectory import make_trajectory, step_cost_matrix

    paper = make_trajectory("optimal", sched, 6, gamma=gamma)
    np.testing.assert_array_equal(paper, least_cost_path(step_cost_matrix(sched, gamma), 6))
    beta = make_trajectory("optimal", sched, 6, cost="expected", method="ddpm-beta", moments=mom)
    np.testing.assert_array_equal(beta, least_cost_path(expected_cost_matrix(sched, "ddpm-beta", mom), 6))
    with pytest.raises(ValueError, match="moments"):
        make_trajectory("optimal", sched, 6, gamma=gamma, cost="expected")
    with pytest.raises(ValueError, match="DP cost"):
        make_trajectory("optimal", sched, 6, gamma=gamma, cost="nope")


def test_even_trajectory_official_rounding():
    """The official code's accumulate-and-round-half-even nodes, by an independent loop in
    exact rational arithmetic (half-even on exact halves). The strides chosen are exact in
    binary, so the float sum lands on the same halves and both must agree."""
    from fractions import Fraction

    from adpm_dist.diffusion.trajectory import even_trajectory

    for n, k in [(1000, 25), (1000, 10), (4000, 7), (1001, 17), (1001, 9)]:  # strides exact in binary
        stride = Fraction(n - 1, k - 1)
        want = [round(1 + j * stride) for j in range(k)]  # Fraction.__round__ is half-even
        np.testing.assert_array_equal(even_trajectory(n, k, "official"), want)
    assert even_trajectory(1000, 25)[12] == 501 and even_trajectory(1000, 25, "official")[12] == 500


def test_weighted_isotonic_matches_scikit_learn():
    from sklearn.isotonic import IsotonicRegression

    from adpm_dist.diffusion.analytic import isotonic_increasing

    rng = np.random.default_rng(3)
    for size in (1, 5, 300):
        y, w = rng.normal(size=size).cumsum(), rng.uniform(0.01, 100, size)
        want = IsotonicRegression().fit_transform(np.arange(size), y, sample_weight=w)
        np.testing.assert_allclose(isotonic_increasing(y, w), want, rtol=1e-10, atol=1e-12)


def test_weighted_fit_keeps_an_exact_region_put():
    """Noise in Γ at t > 900 only: the default fit leaves σ² at t < 800 as the exact Γ gives
    it (to 1e-6); the unweighted global fit moves it (the fault this fit fixes)."""
    from adpm_dist.diffusion.analytic import covariance_estimate

    sched = make_schedule("linear", 1000)
    gamma, _ = _gaussian_truth(sched, 0.55)
    noisy = gamma.copy()
    rng = np.random.default_rng(0)
    noisy[901:] += 3e-4 + rng.normal(0, 1e-4, 100)  # Γ > 1 there: a few s.e. of a 10k-draw Γ, ×10⁴ by β̄/ᾱ
    exact = covariance_estimate(sched, gamma, fit="clip")
    tau = even_trajectory(1000, 100)
    for fit in ("weighted", "isotonic"):
        np.testing.assert_allclose(covariance_estimate(sched, gamma, fit=fit), exact, rtol=1e-12)
    ref = step_variances(sched, tau, "analytic-ddpm", gamma=gamma, fit="clip").sigma2
    below = step_variances(sched, tau, "analytic-ddpm", gamma=gamma).t < 800
    weighted = step_variances(sched, tau, "analytic-ddpm", gamma=noisy, fit="weighted").sigma2
    np.testing.assert_allclose(weighted[below], ref[below], rtol=1e-6)
    global_fit = step_variances(sched, tau, "analytic-ddpm", gamma=noisy, fit="isotonic").sigma2
    assert np.max(np.abs(global_fit[below] / ref[below] - 1)) > 3e-4  # > 1000× the weighted fit's


def _toy_eps(x_t, n):  # a deliberately poor model, so that clipping x̂₀ matters
    return 0.6 * x_t + 0.3 * torch.sin(3 * x_t) + 0.01 * n.reshape(-1, 1).to(x_t.dtype)


def test_ddim_network_direction_is_the_official_step():
    from adpm_dist.diffusion.samplers import sample

    sched = make_schedule("linear", 30)
    tau = np.array([1, 12, 30])
    gens = lambda: make_generators(range(5))  # noqa: E731
    got = sample(_toy_eps, sched, tau, "ddim", gens(), (3,), eta=0.0, dtype=torch.float64,
                 direction="network")
    # by hand: x_30 → x_12 → x_1 → x̂₀, each step √ᾱ_s clip(x̂₀) + √β̄_s ε̂ with the raw ε̂
    x = torch.stack([torch.randn(3, generator=g, dtype=torch.float64) for g in gens()])
    for s, t in [(12, 30), (1, 12)]:
        eps = _toy_eps(x, torch.full((5,), t))
        x0 = predict_x0(sched, x, eps, t).clamp(-1, 1)
        x = math.sqrt(sched.alphas_cumprod[s]) * x0 + math.sqrt(sched.bar_betas[s]) * eps
    want = predict_x0(sched, x, _toy_eps(x, torch.full((5,), 1)), 1).clamp(-1, 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    rederived = sample(_toy_eps, sched, tau, "ddim", gens(), (3,), dtype=torch.float64, direction="x0")
    assert not torch.allclose(got, rederived)  # the clip makes the two directions differ here
    unclipped = [sample(_toy_eps, sched, tau, "ddim", gens(), (3,), dtype=torch.float64, clip_x0=False,
                        direction=d) for d in ("network", "x0")]
    torch.testing.assert_close(*unclipped, rtol=1e-10, atol=1e-10)  # without a clip they are one


def test_ddpm_family_ignores_the_direction():
    from adpm_dist.diffusion.samplers import sample

    sched = make_schedule("linear", 30)
    tau = np.array([1, 12, 30])
    a, b = (sample(_toy_eps, sched, tau, "ddpm-tilde", make_generators(range(4)), (3,), dtype=torch.float64,
                   direction=d) for d in ("network", "x0"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_official_conventions_differ_from_ours_in_every_field_but_the_ddim_direction():
    """Since the K = 10 and 25 FIDs of docs/RESULTS.md §3 the default DDIM direction is the
    official one (the network's ε̂); every other field is ours by default."""
    from adpm_dist.diffusion.conventions import OFFICIAL, OURS

    assert set(OURS.differences(OFFICIAL)) == set(OURS.describe()) - {"ddim_direction"}
    assert OURS.ddim_direction == OFFICIAL.ddim_direction == "network"
    mixed = OURS.with_overrides(ddim_direction="x0", nll_clip_x0=None)
    assert mixed.differences(OURS) == {"ddim_direction": "x0"}
