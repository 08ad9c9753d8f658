"""The Analytic-DPM core against exact oracles (issue 2, proofs a–e)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from adpm_dist.diffusion.analytic import METHODS, step_variances
from adpm_dist.diffusion.likelihood import negative_elbo, negative_elbos
from adpm_dist.diffusion.moments import estimate_gamma
from adpm_dist.diffusion.samplers import make_generators, sample
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.diffusion.trajectory import make_trajectory, optimal_trajectory, path_cost, step_cost_matrix
from adpm_dist.models.oracle import GaussianMixtureEps, two_cluster_mixture
from tests import oracle_truth as truth

SEP, STD, W0 = 0.5, 0.15, 0.3  # two_cluster_mixture's defaults, restated for the truth


def exact_gamma_vector(schedule, d):
    abar = truth.abar_from_betas(schedule.betas[1:])
    return np.concatenate(
        [[np.nan], [truth.exact_gamma(a, d, SEP, STD, W0) for a in abar[1:]]]
    )


@pytest.mark.slow
@pytest.mark.parametrize("sched_name", ["linear", "cosine"])
def test_a_monte_carlo_gamma_matches_exact(sched_name):
    d = 4
    oracle = two_cluster_mixture(d, {"name": sched_name, "num_timesteps": 1000})
    gen = torch.Generator().manual_seed(11)
    x0 = oracle.sample_data(2000, gen)
    gamma, stderr = estimate_gamma(oracle, oracle.schedule, x0, gen)
    exact = exact_gamma_vector(oracle.schedule, d)
    z = (gamma[1:] - exact[1:]) / stderr[1:]
    assert np.all(np.abs(z) < 4.0), f"worst t={np.argmax(np.abs(z)) + 1}, z={np.abs(z).max():.2f}"
    # The z-scores behave like standard normals, not just "small".
    assert abs(z.mean()) < 0.2 and 0.6 < z.std() < 1.4


@pytest.mark.parametrize("sched_name", ["linear", "cosine"])
def test_covariance_identity_is_one_minus_gamma(sched_name):
    """E tr Cov[x₀|x_t]/d = (β̄_t/ᾱ_t)(1 − Γ_t) — with (1 − Γ), not Γ."""
    d = 3
    sched = make_schedule(sched_name, 1000)
    abar = truth.abar_from_betas(sched.betas[1:])
    for t in (1, 5, 50, 200, 400, 700):
        g = truth.exact_gamma(abar[t], d, SEP, STD, W0)
        cov = truth.exact_posterior_cov(abar[t], d, SEP, STD, W0)
        assert cov == pytest.approx((1 - abar[t]) / abar[t] * (1 - g), rel=1e-6)
        assert abs(cov - (1 - abar[t]) / abar[t] * g) > 1e-3 * cov or g == pytest.approx(0.5)


@pytest.mark.parametrize("sched_name", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps", [10, 100])
@pytest.mark.parametrize("family", ["ddpm", "ddim0", "ddim05", "ddim1"])
def test_b_single_gaussian_variance_is_exactly_optimal(sched_name, num_steps, family):
    s0_sq, d = 0.2, 5
    sched = make_schedule(sched_name, 1000)
    abar = truth.abar_from_betas(sched.betas[1:])
    gamma = np.concatenate([[np.nan], (1 - abar[1:]) / (abar[1:] * s0_sq + 1 - abar[1:])])
    # The oracle model's Γ agrees with the closed form (a one-component mixture).
    spec = {"name": sched_name, "num_timesteps": 1000}
    oracle = GaussianMixtureEps([[0.1] * d], [np.sqrt(s0_sq)], [1.0], spec)
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n = torch.tensor([1, 10, 500, 1000])
    eps = oracle(x, n)
    a = torch.tensor(abar[n.numpy()])[:, None]
    expected = (1 - a).sqrt() * (x - a.sqrt() * 0.1) / (a * s0_sq + 1 - a)
    assert torch.allclose(eps, expected, rtol=1e-12, atol=0)

    tau = make_trajectory("even", sched, num_steps)
    if family == "ddpm":
        got = step_variances(sched, tau, "analytic-ddpm", gamma=gamma)
        want = [truth.gaussian_reverse_variance(abar[s], abar[t], s0_sq) for s, t in zip(got.s, got.t)]
    else:
        eta = {"ddim0": 0.0, "ddim05": 0.5, "ddim1": 1.0}[family]
        got = step_variances(sched, tau, "analytic-ddim", gamma=gamma, eta=eta)
        want = [
            truth.gaussian_reverse_variance(abar[s], abar[t], s0_sq, lambda2=lam2)
            for s, t, lam2 in zip(got.s, got.t, got.lambda2)
        ]
    # 1e-8 relative, plus what one ulp of the float64 input Γ_t can move σ² by: where
    # Γ_t → 1 (cosine, t → N) the covariance term (β̄/ᾱ)(1 − Γ_t) is ill-conditioned for
    # *any* code, since 1 − Γ_t ≈ 1e-10 keeps only ~6 significant digits.
    want = np.asarray(want)
    sensitivity = (got.sigma2 - got.lambda2) / (1.0 - gamma[got.t])  # dσ²/dΓ_t
    tol = 1e-8 * want + sensitivity * np.spacing(gamma[got.t])
    assert np.all(np.abs(got.sigma2 - want) <= tol), np.max(np.abs(got.sigma2 - want) / want)
    assert np.median(np.abs(got.sigma2 - want) / want) < 1e-10


@pytest.mark.slow
def test_c_analytic_elbo_beats_baselines_and_gap_shrinks():
    d = 4
    oracle = two_cluster_mixture(d, {"name": "linear", "num_timesteps": 1000})
    sched = oracle.schedule
    gen = torch.Generator().manual_seed(3)
    gamma, _ = estimate_gamma(oracle, sched, oracle.sample_data(1000, gen), gen)
    x0 = oracle.sample_data(400, gen)
    gaps_beta, gaps_tilde = [], []
    for k in (10, 25, 50):
        tau = make_trajectory("even", sched, k)
        nll = {
            m: negative_elbo(oracle, sched, tau, m, x0, make_generators(range(400)), gamma=gamma)["bpd"]
            for m in ("ddpm-tilde", "ddpm-beta", "analytic-ddpm")
        }
        a = nll["analytic-ddpm"]
        for other, gaps in (("ddpm-beta", gaps_beta), ("ddpm-tilde", gaps_tilde)):
            diff = nll[other] - a  # paired: same x₀ and noise
            se = diff.std().item() / np.sqrt(len(diff))
            assert diff.mean().item() > 4 * se, f"K={k}: analytic not better than {other}"
            gaps.append(diff.mean().item())
    assert gaps_beta[0] > gaps_beta[1] > gaps_beta[2] > 0
    assert gaps_tilde[0] > gaps_tilde[1] > gaps_tilde[2] > 0


def test_d_analytic_samples_match_mixture_better_than_ddpm_tilde():
    d = 2
    oracle = two_cluster_mixture(d, {"name": "linear", "num_timesteps": 1000})
    sched = oracle.schedule
    gamma = exact_gamma_vector(sched, d)
    tau = make_trajectory("even", sched, 10)
    reference = oracle.sample_data(1500, torch.Generator().manual_seed(99)).numpy()
    dist = {}
    for method in ("analytic-ddpm", "ddpm-tilde"):
        x = sample(oracle, sched, tau, method, make_generators(range(1000, 2500)), (d,),
                   gamma=gamma, dtype=torch.float64)
        dist[method] = truth.energy_distance(x.numpy(), reference)
    # What a perfect sampler scores against the same reference (sampling noise alone).
    perfect = oracle.sample_data(1500, torch.Generator().manual_seed(7)).numpy()
    null = truth.energy_distance(perfect, reference)
    assert dist["analytic-ddpm"] < dist["ddpm-tilde"], dist
    assert dist["ddpm-tilde"] - dist["analytic-ddpm"] > 3 * null, (dist, null)


def _brute_force(cost, n, k):
    best, best_path = np.inf, None
    for inner in itertools.combinations(range(2, n), k - 2):
        path = (1, *inner, n)
        c = path_cost(cost, path)
        if c < best - 1e-12:
            best, best_path = c, path
    return best, best_path


@pytest.mark.parametrize("sched_name,n", [("linear", 12), ("cosine", 20), ("cosine", 15)])
def test_e_dp_equals_brute_force(sched_name, n):
    sched = make_schedule(sched_name, n)
    rng = np.random.default_rng(n)
    exact = exact_gamma_vector(sched, 3)
    noisy = exact.copy()
    noisy[1:] += rng.normal(0, 0.05, n)  # model error: Γ_t > 1 and < 0 below
    noisy[n // 2], noisy[n], noisy[2] = 1.3, 1.05, -0.1
    for gamma in (exact, noisy):
        cost = step_cost_matrix(sched, gamma)
        assert np.all(np.isfinite(cost[1:, 1:][np.triu_indices(n, 1)]))
        for k in range(2, n + 1):
            tau = optimal_trajectory(sched, gamma, k)
            assert tau[0] == 1 and tau[-1] == n and len(tau) == k and np.all(np.diff(tau) > 0)
            best, _ = _brute_force(cost, n, k)
            assert path_cost(cost, tau) == pytest.approx(best, abs=1e-12)


def test_e_cost_is_the_papers_where_gamma_is_feasible():
    sched = make_schedule("cosine", 20)
    gamma = exact_gamma_vector(sched, 3)
    cost = step_cost_matrix(sched, gamma)
    abar = truth.abar_from_betas(sched.betas[1:])
    for s, t in [(1, 2), (1, 20), (5, 9), (19, 20)]:
        beta_ts = 1 - abar[t] / abar[s]
        assert cost[s, t] == pytest.approx(np.log(1 - beta_ts * gamma[t] / (1 - abar[t])), rel=1e-10)


@pytest.mark.slow
def test_e_optimal_trajectory_nll_not_worse_than_even():
    d = 4
    oracle = two_cluster_mixture(d, {"name": "linear", "num_timesteps": 1000})
    sched = oracle.schedule
    gamma = exact_gamma_vector(sched, d)
    x0 = oracle.sample_data(300, torch.Generator().manual_seed(5))
    for k in (10, 25):
        res = {}
        for kind in ("even", "optimal"):
            tau = make_trajectory(kind, sched, k, gamma=gamma)
            res[kind] = negative_elbo(oracle, sched, tau, "analytic-ddpm", x0,
                                      make_generators(range(300)), gamma=gamma)["bpd"]
        assert res["optimal"].mean() <= res["even"].mean()


def test_methods_list_is_complete_and_ddpm_reduction_holds():
    sched = make_schedule("linear", 100)
    gamma = np.concatenate([[np.nan], np.linspace(0.01, 0.999, 100)])
    tau = make_trajectory("even", sched, 10)
    assert set(METHODS) == {"ddpm-beta", "ddpm-tilde", "ddim", "analytic-ddpm", "analytic-ddim",
                            "residual-ddpm", "residual-ddim"}
    v = step_variances(sched, tau, "analytic-ddpm", gamma=gamma, fit="clip")
    abar = truth.abar_from_betas(sched.betas[1:])
    for s, t, sig in zip(v.s, v.t, v.sigma2):
        a_ts = abar[t] / abar[s]
        reduced = (1 - a_ts) / a_ts * (1 - (1 - a_ts) * gamma[t] / (1 - abar[t]))
        assert sig == pytest.approx(reduced, rel=1e-10)


@pytest.mark.slow
def test_one_pass_of_eps_serves_every_ddpm_method():
    # negative_elbos evaluates ε K times per image whatever the number of
    # methods, and each method's terms equal negative_elbo's bit for bit.
    oracle = two_cluster_mixture(3, {"name": "cosine", "num_timesteps": 200})
    sched = oracle.schedule
    gen = torch.Generator().manual_seed(5)
    gamma, _ = estimate_gamma(oracle, sched, oracle.sample_data(300, gen), gen)
    x0 = oracle.sample_data(50, gen)
    tau = make_trajectory("even", sched, 12)
    calls = []

    def counting(x, n):
        calls.append(x.shape[0])
        return oracle(x, n)

    methods = ["ddpm-tilde", "ddpm-beta", "analytic-ddpm"]
    together = negative_elbos(counting, sched, tau, methods, x0, make_generators(range(50)), gamma=gamma)
    assert len(calls) == len(tau)  # K−1 steps' x_t plus the decoder's x_1
    for m in methods:
        alone = negative_elbo(oracle, sched, tau, m, x0, make_generators(range(50)), gamma=gamma)
        for term in ("prior", "steps", "decoder", "total", "bpd"):
            assert torch.equal(together[m][term], alone[term]), (m, term)
    assert not torch.equal(together["ddpm-beta"]["bpd"], together["analytic-ddpm"]["bpd"])
    with pytest.raises(ValueError, match="DDPM family"):
        negative_elbos(oracle, sched, tau, ["ddpm-tilde", "ddim"], x0, make_generators(range(50)))
