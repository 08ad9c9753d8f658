"""``--covariance-fit weighted`` is weighted by the Γ file's standard errors (issue 23 item 2).

Truth: the exact Γ of Gaussian data x₀ ~ N(0, diag v), Γ_t = mean_i β̄_t/(ᾱ_t v_i + β̄_t), whose
covariance term (β̄_t/ᾱ_t)(1 − Γ_t) is already non-decreasing, so every fit leaves it alone; a
perturbation that breaks monotonicity in a region of large standard error must then be absorbed
there, not by moving σ² where Γ is precise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from adpm_dist.diffusion.analytic import covariance_estimate, step_variances
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.gamma import GammaFile
from adpm_dist.stages import plan

N = 400
REGION = slice(150, 181)  # t = 150..180: few draws, large s.e.


def exact_gamma(sched, v):
    abar, bbar = sched.alphas_cumprod[1:, None], sched.bar_betas[1:, None]
    return np.concatenate([[np.nan], np.mean(bbar / (abar * v + bbar), axis=1)])


def perturbed(gamma):
    """Γ raised in REGION so that its covariance term (β̄/ᾱ)(1 − Γ) halves there (non-monotone)."""
    out = gamma.copy()
    out[REGION] += 0.5 * (1.0 - gamma[REGION])
    return out


def test_a_noisy_region_moves_sigma2_only_there():
    sched = make_schedule("linear", N)
    v = np.exp(np.random.default_rng(1).uniform(np.log(1e-3), np.log(0.5), 64))
    gamma = exact_gamma(sched, v)
    se = np.full(N + 1, 1e-6)
    se[REGION] = 1e-1
    outside = np.ones(N + 1, dtype=bool)
    outside[0] = outside[REGION] = False

    def fitted(g, stderr):
        return covariance_estimate(sched, g, fit="weighted", gamma_stderr=stderr)

    base, bumped = fitted(gamma, se), fitted(perturbed(gamma), se)
    np.testing.assert_allclose(bumped[outside], base[outside], rtol=1e-6, atol=0)
    assert np.max(np.abs(bumped[REGION] / base[REGION] - 1.0)) > 0.05  # the region itself moved
    # σ² = λ² + γ²·cov on any trajectory: unchanged to 1e-6 at every step from t outside REGION.
    tau = np.floor(1.0 + (N - 1) * np.arange(60) / 59 + 0.5).astype(int)
    sig = [step_variances(sched, tau, "analytic-ddpm", gamma=g, gamma_stderr=se)
           for g in (gamma, perturbed(gamma))]
    keep = outside[sig[0].t]
    assert keep.sum() >= 50
    np.testing.assert_allclose(sig[1].sigma2[keep], sig[0].sigma2[keep], rtol=1e-6, atol=0)
    # Without the standard errors (weights (ᾱ/β̄)² alone, the old behaviour) the dip drags its
    # neighbours: the covariance outside REGION moves by far more than 1e-6.
    blind = fitted(perturbed(gamma), None)
    assert np.max(np.abs(blind[outside] / base[outside] - 1.0)) > 1e-3


def test_equal_standard_errors_reproduce_the_fit_without_them():
    sched = make_schedule("linear", N)
    gamma = perturbed(exact_gamma(sched, np.array([0.01, 0.1, 0.4])))
    gamma[N - 20:] += 3e-4  # Γ > 1 near N too
    without = covariance_estimate(sched, gamma, fit="weighted")
    for value in (1e-7, 0.3):
        equal = covariance_estimate(sched, gamma, fit="weighted", gamma_stderr=np.full(N, value))
        np.testing.assert_allclose(equal, without, rtol=1e-12, atol=1e-15)


def test_plan_uses_the_gamma_files_standard_errors(tmp_path, capsys):
    sched = make_schedule("linear", N)
    gamma = perturbed(exact_gamma(sched, np.array([0.01, 0.1, 0.4])))
    spread = np.full(N + 1, 1e-6)
    spread[REGION] = 0.05  # the draws scatter widely in REGION: a large s.e. there
    gf = GammaFile.empty(sched, {"digest": "d0", "name": "toy"})
    n = np.arange(1, N + 1)
    for sign in (1.0, -1.0):
        gf.add(n, gamma[1:] + sign * spread[1:])
    gf.contributions.append({"run_id": "t", "rank": 0, "world_size": 1, "samples": [0, 2]})
    (tmp_path / "g.json").write_text(gf.to_json())
    assert plan.main(["--gamma", str(tmp_path / "g.json"), "--steps", "40", "--json"]) == 0
    got = np.array([row["sigma2"] for row in json.loads(capsys.readouterr().out)["steps"]])
    tau = np.floor(1.0 + (N - 1) * np.arange(40) / 39 + 0.5).astype(int)
    stderr = np.concatenate([[np.nan], gf.stderr])
    want = step_variances(sched, tau, "analytic-ddpm", gamma=gf.gamma_vector(), gamma_stderr=stderr).sigma2
    blind = step_variances(sched, tau, "analytic-ddpm", gamma=gf.gamma_vector()).sigma2
    np.testing.assert_allclose(got, want, rtol=1e-14)
    assert np.max(np.abs(got / blind - 1.0)) > 1e-3  # the s.e. changed what plan prints


def test_the_diffusers_scheduler_carries_the_standard_errors():
    pytest.importorskip("diffusers")
    from adpm_dist.integrations.diffusers.scheduler import AnalyticDPMScheduler

    sched = make_schedule("linear", N)
    gamma = perturbed(exact_gamma(sched, np.array([0.01, 0.1, 0.4])))
    gf = GammaFile.empty(sched, {"digest": "d0", "name": "toy"})
    spread = np.where(np.isin(np.arange(1, N + 1), np.arange(N + 1)[REGION]), 0.05, 1e-6)
    for sign in (1.0, -1.0):
        gf.add(np.arange(1, N + 1), gamma[1:] + sign * spread)
    cfg = {"num_train_timesteps": N, "beta_start": 1e-4, "beta_end": 0.02,
           "beta_schedule": "linear"}
    s = AnalyticDPMScheduler.from_gamma_file(gf, cfg)
    np.testing.assert_array_equal(s.config.gamma_stderr, gf.stderr)
    s.set_timesteps(40)
    want = step_variances(s.schedule, s._tau, "analytic-ddpm", gamma=gf.gamma_vector(),
                          gamma_stderr=gf.stderr)
    np.testing.assert_allclose([s._steps[int(t)][2] for t in want.t], want.sigma2, rtol=1e-14)
    blind = step_variances(s.schedule, s._tau, "analytic-ddpm", gamma=gf.gamma_vector()).sigma2
    assert np.max(np.abs(want.sigma2 / blind - 1.0)) > 1e-3  # the s.e. matter on this file
