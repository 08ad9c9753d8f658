"""The optimal K-step trajectory by dynamic programming (paper §4, Eq. 17).

For the DDPM family with the analytic variance, the negative ELBO of a
trajectory τ is, up to terms that telescope (and so do not depend on τ),

    (d/2) Σ_{k=2}^{K} J(τ_{k−1}, τ_k),   J(s, t) = log(1 − β_{t|s} Γ_t / β̄_t),

so the best τ is a least-cost K-node path from 1 to N: an O(K N²) DP with no
network calls once Γ is known.

The log's argument. With an exact model Γ_t ≤ 1, and then the argument is
≥ α_{t|s} β̄_s / β̄_t > 0. Model error can make Γ_t > 1 and the argument ≤ 0
(log undefined, NaN, or −∞ that the DP would greedily love). Our rule: the DP
scores each step with the variance the sampler will *actually* use, i.e. with
Γ_t projected onto Theorem 2's feasible interval [1 − (ᾱ_t/β̄_t)((b−a)/2)², 1]
(:func:`clipped_gamma`). This is the same clip the analytic variance applies,
so cost and sampler never disagree, the argument stays ≥ α_{t|s}β̄_s/β̄_t > 0,
and no ad-hoc split of the timeline is needed. Where Γ_t hits the upper end
the step's covariance term is 0 and its cost is the smallest one possible for
that (s, t) — the same optimism the clipped sampler has.
"""

from __future__ import annotations

import numpy as np

from .analytic import clipped_gamma
from .schedule import Schedule, _check_k


def step_cost_matrix(schedule: Schedule, gamma, data_range=(-1.0, 1.0)) -> np.ndarray:
    """C[s, t] = J(s, t) for 1 ≤ s < t ≤ N, +inf elsewhere; shape (N+1, N+1)."""
    n = schedule.num_timesteps
    g = clipped_gamma(schedule, gamma, data_range)
    abar, bbar = schedule.alphas_cumprod, schedule.bar_betas
    idx = np.arange(1, n + 1)
    s, t = idx[:, None], idx[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        beta_ts = 1.0 - abar[t] / abar[s]
        cost = np.log1p(-beta_ts * g[t] / bbar[t])
    out = np.full((n + 1, n + 1), np.inf)
    out[1:, 1:] = np.where(s < t, cost, np.inf)
    return out


def path_cost(cost: np.ndarray, trajectory) -> float:
    tau = np.asarray(trajectory)
    return float(np.sum(cost[tau[:-1], tau[1:]]))


def optimal_trajectory(schedule: Schedule, gamma, num_steps: int, data_range=(-1.0, 1.0)) -> np.ndarray:
    """Least-cost τ_1 = 1 < … < τ_K = N under J, for any 2 ≤ K ≤ N.

    D_k[t] = min_s D_{k−1}[s] + J(s, t), one vectorised (N+1)² min per k;
    ties go to the smallest s, so the answer is deterministic.
    """
    n = schedule.num_timesteps
    _check_k(n, num_steps)
    cost = step_cost_matrix(schedule, gamma, data_range)
    best = np.full(n + 1, np.inf)
    best[1] = 0.0
    back = np.zeros((num_steps, n + 1), dtype=np.int64)
    cols = np.arange(n + 1)
    for k in range(1, num_steps):
        total = best[:, None] + cost
        back[k] = np.argmin(total, axis=0)
        best = total[back[k], cols]
    if not np.isfinite(best[n]):
        raise RuntimeError("no finite-cost trajectory found (this is a bug: please report Γ and K)")
    tau = np.empty(num_steps, dtype=np.int64)
    tau[-1] = n
    for k in range(num_steps - 1, 0, -1):
        tau[k - 1] = back[k, tau[k]]
    return tau
