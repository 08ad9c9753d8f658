#!/usr/bin/env python
"""The optimal trajectory on an infeasible Γ (issue 23 item 1): before/after exact NELBO, as JSON.

Gaussian data x₀ ~ N(0, diag v), v log-uniform in [1e-4, 0.5], d = 3072, linear N = 1000: the
optimal ε-model is linear, Γ_t = mean_i β̄_t/(ᾱ_t v_i + β̄_t), and every step's expected KL is
closed form, so the negative ELBO of any trajectory is exact (prior KL + Σ step KLs, bits/dim;
the decoder term depends only on τ_1 = 1 and is left out). Γ gets +2e-5 for t > 900 (Γ_t > 1
near N, as Monte-Carlo estimates do). For every covariance fit it prints τ and the NELBO of:
``before`` (the DP's cost as it was: the paper's J with the fit's own covariance), ``after``
(:func:`adpm_dist.diffusion.trajectory.optimal_trajectory`: the sampler's σ² scored under the
feasible covariance), ``official`` (``--dp-cost official``, the official code's ``_dp_seg``) and
``even``; every σ² is the fit's own.

    python tools/infeasible_gamma_dp.py [--steps 10] [--bump 2e-5] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from adpm_dist.diffusion.analytic import COVARIANCE_FITS, covariance_estimate, step_variances
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.diffusion.trajectory import even_trajectory, least_cost_path, optimal_trajectory

N, D = 1000, 3072


def old_cost(sched, gamma, fit) -> np.ndarray:
    """The DP cost before the fix: J = log(σ² α_{t|s}/β_{t|s}) with σ² from the fit's covariance."""
    cov = covariance_estimate(sched, gamma, fit=fit)
    abar, bbar = sched.alphas_cumprod, sched.bar_betas
    s, t = np.arange(N + 1)[:, None], np.arange(N + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = abar[t] / abar[s]
        beta = 1.0 - alpha
        sigma2 = bbar[s] * beta / bbar[t] + abar[s] * beta**2 / bbar[t] ** 2 * cov[t]
        cost = np.log(sigma2 * alpha / beta)
    return np.where((s >= 1) & (s < t), cost, np.inf)


def exact_nelbo(sched, v, post_var, gamma, tau, fit) -> float:
    abar, bbar = sched.alphas_cumprod, sched.bar_betas
    var = step_variances(sched, tau, "analytic-ddpm", gamma=gamma, fit=fit)
    total = 0.5 * np.mean(bbar[N] + abar[N] * v - 1.0 - math.log(bbar[N]))
    for s, t, sig2 in zip(var.s, var.t, var.sigma2):
        beta = 1.0 - abar[t] / abar[s]
        tilde, gam2 = bbar[s] * beta / bbar[t], abar[s] * beta**2 / bbar[t] ** 2
        total += 0.5 * np.mean(tilde / sig2 - 1.0 + math.log(sig2 / tilde) + gam2 * post_var[t] / sig2)
    return float(total / math.log(2.0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--bump", type=float, default=2e-5, help="added to Γ_t for t > 900")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sched = make_schedule("linear", N)
    v = np.exp(np.random.default_rng(args.seed).uniform(math.log(1e-4), math.log(0.5), D))
    abar, bbar = sched.alphas_cumprod[1:, None], sched.bar_betas[1:, None]
    gamma = np.concatenate([[np.nan], np.mean(bbar / (abar * v + bbar), axis=1)])
    post_var = np.concatenate([np.zeros((1, D)), v * bbar / (abar * v + bbar)])
    gamma[901:] += args.bump
    k = args.steps
    out = {"case": {"N": N, "d": D, "K": k, "bump": args.bump, "max_gamma": float(np.nanmax(gamma))}}
    for fit in COVARIANCE_FITS:
        taus = {"before": least_cost_path(old_cost(sched, gamma, fit), k),
                "after": optimal_trajectory(sched, gamma, k, fit=fit),
                "official": optimal_trajectory(sched, gamma, k, fit=fit, cost="official"),
                "even": even_trajectory(N, k)}
        out[fit] = {name: {"tau": tau.tolist(), "nelbo_bpd": exact_nelbo(sched, v, post_var, gamma, tau, fit)}
                    for name, tau in taus.items()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
