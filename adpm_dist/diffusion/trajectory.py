"""The optimal K-step trajectory by dynamic programming (paper §4, Eq. 17).

For the DDPM family with the analytic variance, the negative ELBO of a
trajectory τ is, up to terms that telescope (and so do not depend on τ),

    (d/2) Σ_{k=2}^{K} J(τ_{k−1}, τ_k),   J(s, t) = log(1 − β_{t|s} Γ_t / β̄_t),

because σ*²_{s|t} = (β_{t|s}/α_{t|s})(1 − β_{t|s}Γ_t/β̄_t) and the step's KL
is (d/2) log(σ*²/β̃_{s|t}). The best τ is a least-cost K-node path from 1 to N:
an O(K N²) DP with no network calls once Γ is known.

When the log's argument is ≤ 0. With an exact model Γ_t ≤ 1 and the argument
is ≥ α_{t|s}β̄_s/β̄_t > 0. An estimated Γ_t can exceed 1, most often at large t
where Monte-Carlo error is amplified by β̄_t/ᾱ_t; the log is then undefined,
and merely clipping Γ_t to 1 is worse than useless: it says x₀ is known
exactly from x_t, so a jump from s = 1 straight to such a t looks almost free
and the DP takes it (we saw NLL go from 7 to 900 bits/dim on a 2-D mixture).

Our rule: score every step by the expected KL of the variance the sampler will
actually use, σ² = β̃_{s|t} + γ²_{s|t}·c_t with c_t the covariance estimate of the
chosen fit (:func:`analytic.covariance_estimate`), under the *feasible* covariance
ĉ_t — Γ's covariance term clipped to Theorem 2's bounds and projected onto
non-decreasing sequences in t (a property the true quantity has), weighted by the
Γ file's standard errors (the ``weighted`` fit):

    J(s, t) = log(σ² α_{t|s}/β_{t|s}) + γ²_{s|t}(ĉ_t − c_t)/σ²

(2/d times the step's expected KL plus terms that telescope). Then σ² ≥ β̃ > 0, the
log's argument is always positive, the DP and the sampler never disagree on σ², and no
fit can make a jump look free: with the plain clip a Γ_t > 1 gives c_t = 0, but ĉ_t is
at least the covariance of every earlier t, so the step 1 → t pays γ²ĉ_t/σ². For the
``weighted`` fit (ĉ = c) and for an exact Γ (already feasible) J is exactly the paper's.
On Gaussian data with Γ_t > 1 for t > 900 the plain-clip DP chose τ = [1, 905, 906, …]
(418 bits/dim against 3.4 for the official code's trajectory; tests/test_official_dp_split.py).

``cost='official'`` is the official code's ``_dp_seg`` instead (baofff/Analytic-DPM,
``cifar_imagenet_codes/core/inference/utils.py``: ``_split``, ``_get_fn_m``,
``_solve_fn_dp``): the timeline is cut where Γ first exceeds 1 and the paper's J (no
clip) is minimised on the part before the cut; see :func:`official_split_trajectory`.
"""

from __future__ import annotations

import math

import numpy as np

from adpm_dist.diffusion.analytic import as_gamma_vector, covariance_estimate
from adpm_dist.diffusion.residual import ErrorMoments, expected_cost_matrix
from adpm_dist.diffusion.schedule import Schedule

TRAJECTORIES = ("even", "quadratic", "optimal")


def _check_k(num_timesteps: int, num_steps: int) -> None:
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(f"number of steps K must satisfy 2 <= K <= N={num_timesteps}, got K={num_steps}")


def even_trajectory(num_timesteps: int, num_steps: int, rounding: str = "half-up") -> np.ndarray:
    """τ_k = round(1 + (N−1)(k−1)/(K−1)), k = 1..K.

    ``rounding='half-up'`` (default) computes each node exactly and rounds halves up;
    ``'official'`` reproduces the official Analytic-DPM code: the stride (N−1)/(K−1) is
    accumulated in floating point and each node rounded half to even (Python's round),
    which moves single nodes where the exact value is a half (N = 1000, K = 25: 500 vs 501).
    """
    _check_k(num_timesteps, num_steps)
    if rounding == "official":
        stride, position, nodes = (num_timesteps - 1) / (num_steps - 1), 1.0, []
        for _ in range(num_steps):
            nodes.append(round(position))  # float accumulation and banker's rounding, on purpose
            position += stride
        return np.asarray(nodes, dtype=np.int64)
    if rounding != "half-up":
        raise ValueError(f"unknown rounding {rounding!r}; choose 'half-up' or 'official'")
    k = np.arange(num_steps, dtype=np.float64)
    tau = np.floor(1.0 + (num_timesteps - 1) * k / (num_steps - 1) + 0.5).astype(np.int64)
    return tau


def quadratic_trajectory(num_timesteps: int, num_steps: int) -> np.ndarray:
    """τ_k ≈ 1 + (N−1)((k−1)/(K−1))², made strictly increasing.

    Dense near n = 1 where the data detail lives (Song et al., DDIM). Where the
    rounding would repeat a timestep we push it up by one; the cap τ_k ≤ N−(K−k)
    keeps room for the remaining nodes, so every K in [2, N] works.
    """
    _check_k(num_timesteps, num_steps)
    k = np.arange(num_steps, dtype=np.float64)
    raw = np.floor(1.0 + (num_timesteps - 1) * (k / (num_steps - 1)) ** 2 + 0.5).astype(np.int64)
    tau = raw.copy()
    for i in range(1, num_steps):
        tau[i] = max(tau[i], tau[i - 1] + 1)
    for i in range(num_steps - 2, -1, -1):
        tau[i] = min(tau[i], tau[i + 1] - 1)
    return tau


def make_trajectory(kind: str, schedule: Schedule, num_steps: int, gamma=None, rounding: str = "half-up",
                    **kw) -> np.ndarray:
    """τ_1 = 1 < … < τ_K = N by name: 'even', 'quadratic' or 'optimal' (needs Γ)."""
    n = schedule.num_timesteps
    if kind == "even":
        return even_trajectory(n, num_steps, rounding)
    if kind == "quadratic":
        return quadratic_trajectory(n, num_steps)
    if kind == "optimal":
        if gamma is None and kw.get("cost", "paper") in ("paper", "official"):
            raise ValueError("the optimal trajectory needs a Γ vector (from a Γ file)")
        return optimal_trajectory(schedule, gamma, num_steps, **kw)
    raise ValueError(f"unknown trajectory '{kind}'; choose one of {list(TRAJECTORIES)}")


def step_cost_matrix(
    schedule: Schedule, gamma, data_range=(-1.0, 1.0), fit: str = "weighted", gamma_stderr=None
) -> np.ndarray:
    """C[s, t] = J(s, t) for 1 ≤ s < t ≤ N (module doc: the sampler's σ² under ``fit``, scored
    with the feasible covariance), +inf elsewhere; shape (N+1, N+1). ``gamma_stderr``: the Γ
    file's standard errors (the weights of the feasible fit)."""
    n = schedule.num_timesteps
    cov = covariance_estimate(schedule, gamma, data_range, fit, gamma_stderr)
    truth = cov if fit == "weighted" else covariance_estimate(schedule, gamma, data_range, "weighted",
                                                              gamma_stderr)
    missing = np.flatnonzero(~np.isfinite(cov[2:])) + 2  # Γ_1 is never used by a step
    if missing.size:
        raise ValueError(
            f"the optimal trajectory needs Γ at every timestep 2..{n}; {missing.size} are missing "
            f"(first: {missing[:5].tolist()}); run the Γ job with --timesteps all")
    abar, bbar = schedule.alphas_cumprod, schedule.bar_betas
    idx = np.arange(1, n + 1)
    s, t = idx[:, None], idx[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha_ts = abar[t] / abar[s]
        beta_ts = 1.0 - alpha_ts
        tilde = bbar[s] * beta_ts / bbar[t]
        gam2 = abar[s] * beta_ts**2 / bbar[t] ** 2
        sigma2 = tilde + gam2 * cov[t]
        cost = np.log(sigma2 * alpha_ts / beta_ts) + gam2 * (truth[t] - cov[t]) / sigma2
    out = np.full((n + 1, n + 1), np.inf)
    out[1:, 1:] = np.where(s < t, cost, np.inf)
    return out


def official_split(gamma, num_timesteps: int, num_steps: int) -> tuple[int, int, int]:
    """(K₁, N₁, K₂) of the official code's ``_split``: the first t with Γ_t > 1 starts the
    "bad" region; twice its length, num_bad = 2(N − t + 1), is cut off the end (N₁ = N −
    num_bad), K₁ = ⌈(1 − 0.8·num_bad/N)K⌉ nodes go to [1, N₁] (at most N₁; at least K −
    num_bad; at most K − 1 when anything is cut) and K₂ = K − K₁ to the rest."""
    n, k = num_timesteps, num_steps
    g = as_gamma_vector(gamma, n)
    above = np.flatnonzero(g[1:] > 1.0)
    num_bad = 2 * (n - int(above[0])) if above.size else 0  # above[0] + 1 is the first bad t
    n1 = n - num_bad
    k1 = math.ceil((1.0 - 0.8 * (num_bad / n)) * k)
    k1 = max(min(k1, n1), k - num_bad)
    if num_bad > 0 and k1 == k:
        k1 = k - 1
    if n1 < 1 or not (k1 >= 2 or (k1 == 1 and n1 == 1)):
        raise ValueError(f"the official split cannot place K={k} nodes: Γ_t > 1 from t = "
                         f"{int(above[0]) + 1} leaves [1, {n1}] for {k1} of them (the official code "
                         "fails here too); use another --dp-cost or --covariance-fit")
    return k1, n1, k - k1


def official_split_trajectory(schedule: Schedule, gamma, num_steps: int) -> np.ndarray:
    """The official code's ``_dp_seg``, node for node: the paper's J(s, t) = log(1 − β_{t|s}Γ_t/β̄_t)
    (no clip, β_{t|s} from the cumulative product of the α's as there) minimised over K₁-node
    paths on [1, N₁] (:func:`official_split`), then K₂ nodes round(N − i(N − N₁)/K₂), i < K₂,
    on the cut-off end (Python's round, half to even). K = 2 gives [1, N], the only choice."""
    n = schedule.num_timesteps
    if num_steps == 2:  # the only 2-node path (the official code's split fails here when Γ_t > 1)
        return np.array([1, n], dtype=np.int64)
    k1, n1, k2 = official_split(gamma, n, num_steps)
    g = as_gamma_vector(gamma, n)
    alphas = 1.0 - schedule.betas
    score = g / schedule.bar_betas  # index 0: NaN, never used
    cost = np.full((n1 + 1, n1 + 1), np.inf)
    for s in range(1, n1):
        beta_ts = 1.0 - np.cumprod(alphas[s + 1: n1 + 1])
        cost[s, s + 1:] = np.log(1.0 - beta_ts * score[s + 1: n1 + 1])
    first = np.arange(1, n1 + 1) if k1 == n1 else least_cost_path(cost, k1)
    last = [round(n - (n - n1) / k2 * i) for i in range(k2)][::-1]
    tau = np.concatenate([first, np.asarray(last, dtype=np.int64)]).astype(np.int64)
    if np.any(np.diff(tau) <= 0):
        raise ValueError(f"the official split gives a non-increasing trajectory for K={num_steps}: "
                         f"{tau.tolist()[:12]}…; use another --dp-cost")
    return tau


def path_cost(cost: np.ndarray, trajectory) -> float:
    tau = np.asarray(trajectory)
    return float(np.sum(cost[tau[:-1], tau[1:]]))


DP_COSTS = ("paper", "expected", "official")


def optimal_trajectory(
    schedule: Schedule, gamma, num_steps: int, data_range=(-1.0, 1.0), fit: str = "weighted",
    cost: str = "paper", method: str = "analytic-ddpm", moments: ErrorMoments | None = None,
    gamma_stderr=None,
) -> np.ndarray:
    """Least-cost τ_1 = 1 < … < τ_K = N for any 2 ≤ K ≤ N.

    ``cost='paper'``: the paper's J(s, t) (Analytic-DPM's variance, Eq. 17), scored with a
    feasible covariance (module doc); ``cost='official'``: the official code's ``_dp_seg``
    (:func:`official_split_trajectory`); ``cost='expected'``: ``method``'s actual expected
    step KL from the model-error ``moments``
    (:func:`~adpm_dist.diffusion.residual.expected_cost_matrix`; Γ only for analytic-ddpm).
    ``gamma_stderr``: the Γ file's standard errors, the weights of the ``weighted`` fit.
    """
    _check_k(schedule.num_timesteps, num_steps)
    if cost == "paper":
        return least_cost_path(step_cost_matrix(schedule, gamma, data_range, fit, gamma_stderr), num_steps)
    if cost == "official":
        return official_split_trajectory(schedule, gamma, num_steps)
    if cost != "expected":
        raise ValueError(f"unknown DP cost {cost!r}; choose one of {list(DP_COSTS)}")
    if moments is None:
        raise ValueError("the expected-cost DP needs the model-error moments (a Γ file of format 2)")
    cov = None
    if method == "analytic-ddpm":
        if gamma is None:
            raise ValueError("the expected-cost DP for analytic-ddpm needs Γ")
        cov = covariance_estimate(schedule, gamma, data_range, fit, gamma_stderr)
    return least_cost_path(expected_cost_matrix(schedule, method, moments, cov, data_range), num_steps)


def least_cost_path(cost: np.ndarray, num_steps: int) -> np.ndarray:
    """The K-node path 1 = τ_1 < … < τ_K = N of least total cost C[τ_{k−1}, τ_k].

    D_k[t] = min_s D_{k−1}[s] + C[s, t], one vectorised (N+1)² min per k;
    ties go to the smallest s, so the answer is deterministic.
    """
    n = cost.shape[0] - 1
    # Laid out [t, s] so each min runs along contiguous memory, into one reused buffer:
    # three times faster than a strided argmin over fresh (N+1)² arrays.
    by_target = np.ascontiguousarray(cost.T)
    total = np.empty_like(by_target)
    best = np.full(n + 1, np.inf)
    best[1] = 0.0
    back = np.zeros((num_steps, n + 1), dtype=np.int64)
    rows = np.arange(n + 1)
    for k in range(1, num_steps):
        np.add(by_target, best[None, :], out=total)
        back[k] = np.argmin(total, axis=1)
        best = total[rows, back[k]]
    if not np.isfinite(best[n]):
        raise RuntimeError("no finite-cost trajectory found (a bug: please report Γ and K)")
    tau = np.empty(num_steps, dtype=np.int64)
    tau[-1] = n
    for k in range(num_steps - 1, 0, -1):
        tau[k - 1] = back[k, tau[k]]
    return tau
