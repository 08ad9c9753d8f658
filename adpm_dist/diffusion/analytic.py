"""Reverse-step variances for every method, including Analytic-DPM's optimum.

For a step s = τ_{k−1} → t = τ_k of a trajectory (docs/architecture.md, paper §3–4):

    σ² = λ² + γ² · clip((β̄_t/ᾱ_t)(1 − Γ_t), 0, ((b−a)/2)²)

with, in the DDPM family, λ² = β̃_{s|t} = β̄_s β_{t|s}/β̄_t and
γ² = ᾱ_s β_{t|s}²/β̄_t² (paper Eq. 7/Thm. 1 on a subsequence, Eq. 14), and in
the DDIM family λ² = η² β̃_{s|t}, γ² = (√ᾱ_s − √((β̄_s − λ²) ᾱ_t/β̄_t))²
(paper Eq. 9). The clip is Theorem 2's bound on E tr Cov[x₀|x_t]/d for data in
[a, b]. Note the factor (1 − Γ_t): Γ_t = E‖ε_θ‖²/d large means the network
is sure of the noise, so little posterior covariance is left.

The reverse mean always has the DDIM form
    μ = √ᾱ_s x̂₀ + √(β̄_s − λ²) · (x_t − √ᾱ_t x̂₀)/√β̄_t,
which for λ² = β̃ is exactly the DDPM posterior mean μ̃(x_t, x̂₀).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from adpm_dist.diffusion.residual import (
    DDPM_RULES,
    ErrorMoments,
    ddim_gamma2,
    ddpm_family_sigma2,
    kl_optimal_variance,
    mean_error,
    step_coefficients,
)
from adpm_dist.diffusion.schedule import Schedule

METHODS = ("ddpm-beta", "ddpm-tilde", "ddim", "analytic-ddpm", "analytic-ddim", "residual-ddpm",
           "residual-ddim")
ANALYTIC_METHODS = ("analytic-ddpm", "analytic-ddim")  # need Γ
# The KL-optimal variance of the model at hand (diffusion/residual.py): they need the
# model-error moments of a Γ file (format 2).
RESIDUAL_METHODS = ("residual-ddpm", "residual-ddim")
DDPM_FAMILY = DDPM_RULES  # one list: the σ² rules of diffusion/residual.py


def is_ddpm_family(method: str) -> bool:
    """True where the mean is the posterior mean μ̃(x_t, x̂₀) (λ² = β̃), False for DDIM-style steps."""
    return method in DDPM_FAMILY


@dataclass(frozen=True)
class StepVariances:
    """Per-step coefficients, ordered as sampling runs: from t = τ_K = N down to t = τ_2.

    ``s``/``t``: the step's target and source timesteps; ``lambda2``: the λ² in the
    reverse mean; ``sigma2``: the variance actually used (after every clip).
    """

    method: str
    s: np.ndarray
    t: np.ndarray
    lambda2: np.ndarray
    sigma2: np.ndarray

    def rows(self) -> list[dict]:
        return [
            {"s": int(s), "t": int(t), "sigma2": float(v)}
            for s, t, v in zip(self.s, self.t, self.sigma2)
        ]


def as_gamma_vector(gamma, num_timesteps: int, allow_missing: bool = False) -> np.ndarray:
    """Γ as float64 of length N+1 (index 0 unused); accepts length N or N+1.

    ``allow_missing``: NaN marks a timestep the Γ file does not cover (a Γ job
    restricted with ``--timesteps``); infinities are always refused.
    """
    g = np.asarray(gamma, dtype=np.float64).reshape(-1)
    if g.shape[0] == num_timesteps:
        g = np.concatenate([[np.nan], g])
    if g.shape[0] != num_timesteps + 1:
        raise ValueError(f"Γ has {g.shape[0]} entries; the schedule has N={num_timesteps}")
    bad = np.isinf(g[1:]) if allow_missing else ~np.isfinite(g[1:])
    if np.any(bad):
        raise ValueError(f"Γ is not finite at n = {(np.flatnonzero(bad)[:5] + 1).tolist()}")
    return g


def _describe_timesteps(ts) -> str:
    ts = [int(v) for v in ts]
    return ",".join(map(str, ts[:12])) + (f",… ({len(ts)} in all)" if len(ts) > 12 else "")


def isotonic_increasing(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares non-decreasing fit (pool-adjacent-violators), O(n)."""
    values = np.asarray(values, dtype=np.float64)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    means: list[float] = []
    mass: list[float] = []
    sizes: list[int] = []
    for v, w in zip(values, weights):
        means.append(float(v))
        mass.append(float(w))
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, n2 = means.pop(), mass.pop(), sizes.pop()
            m1, w1, n1 = means.pop(), mass.pop(), sizes.pop()
            means.append((m1 * w1 + m2 * w2) / (w1 + w2))
            mass.append(w1 + w2)
            sizes.append(n1 + n2)
    return np.repeat(means, sizes)


COVARIANCE_FITS = ("weighted", "isotonic", "clip")


def covariance_estimate(
    schedule: Schedule, gamma, data_range=(-1.0, 1.0), fit: str = "weighted", gamma_stderr=None
) -> np.ndarray:
    """E tr Cov[x₀|x_t]/d ≈ (β̄_t/ᾱ_t)(1 − Γ_t) for t = 0..N (index 0: 0), made feasible.

    Theorem 2 bounds it to [0, ((b−a)/2)²]; Γ_t ≥ 0 adds the bound β̄_t/ᾱ_t.
    ``fit``:

    - ``'clip'``: the paper's (and the official code's) plain clip to those bounds.
    - ``'isotonic'``: the clipped estimate projected onto non-decreasing sequences in t
      (least squares, every t weighted alike). The true quantity is non-decreasing
      (x₀ → x_s → x_t is a Markov chain, so x_t never says more about x₀ than x_s), and
      Monte-Carlo error in Γ_t is amplified by β̄_t/ᾱ_t at large t, where the raw
      estimate jumps between the clips. But the fit is global: noise at t > 900 can
      pool a flat plateau far back and move σ² where Γ is exact.
    - ``'weighted'`` (default): the same projection weighted by 1/s.e.(estimate)², with
      s.e. = (β̄_t/ᾱ_t)·s.e.(Γ_t) (``gamma_stderr``; a constant when not given, as Γ has
      the same number of draws at every t). A noisy large-t value then gives way to
      precise ones instead of dragging them: a region where the estimate is feasible
      and precise stays put.

    For an exact, feasible Γ every fit changes nothing. Order: clip to the box, fit,
    clip again (the box's upper edge is itself non-decreasing).
    """
    if fit not in COVARIANCE_FITS:
        raise ValueError(f"unknown covariance fit {fit!r}; choose one of {list(COVARIANCE_FITS)}")
    a, b = data_range
    n = schedule.num_timesteps
    g = as_gamma_vector(gamma, n, allow_missing=True)
    known = np.isfinite(g[1:])  # a partial Γ file: the fit runs over the timesteps it has
    abar, bbar = schedule.alphas_cumprod[1:][known], schedule.bar_betas[1:][known]
    upper = np.minimum(((b - a) / 2.0) ** 2, bbar / abar)
    cov_known = np.clip((bbar / abar) * (1.0 - g[1:][known]), 0.0, upper)
    if fit != "clip":
        weights = None
        if fit == "weighted":
            se = (bbar / abar) * _usable_stderr(gamma_stderr, n)[known]
            weights = 1.0 / se**2
        # Clip first so that wild estimates at large t cannot drag the fit down.
        cov_known = np.clip(isotonic_increasing(cov_known, weights), 0.0, upper)
    cov = np.full(n, np.nan)
    cov[known] = cov_known
    return np.concatenate([[0.0], cov])


def _usable_stderr(gamma_stderr, n: int) -> np.ndarray:
    """s.e.(Γ_t) for t = 1..N as weights can use: ones when not given (every t has the same
    number of draws); a missing, infinite or zero entry (a timestep with one draw, or none) gets
    the largest finite positive s.e., so that an unknown precision never outweighs a known one."""
    if gamma_stderr is None:
        return np.ones(n)
    se = np.asarray(gamma_stderr, dtype=np.float64).reshape(-1)
    se = se[1:] if se.shape[0] == n + 1 else se
    if se.shape[0] != n:
        raise ValueError(f"the Γ standard errors have {se.shape[0]} entries; the schedule has N={n}")
    good = np.isfinite(se) & (se > 0)
    return np.where(good, se, se[good].max() if good.any() else 1.0)


def pixel_clip_bound(clip_pixel: float) -> float:
    """Largest σ² with E|σ z| ≤ y·2/255 for z ~ N(0, 1): σ ≤ y·(2/255)·√(π/2)."""
    return (clip_pixel * (2.0 / 255.0) * math.sqrt(math.pi / 2.0)) ** 2


def step_variances(
    schedule: Schedule,
    trajectory,
    method: str,
    gamma=None,
    eta: float = 0.0,
    data_range=(-1.0, 1.0),
    clip_pixel: float | None = None,
    fit: str = "weighted",
    moments: ErrorMoments | None = None,
    direction: str = "network",
    gamma_stderr=None,
) -> StepVariances:
    """σ² for every step s → t of ``trajectory`` (ascending τ_1 = 1 < … < τ_K = N).

    ``eta`` applies to the DDIM family only. ``clip_pixel`` (y, off by default)
    caps the variance of the step into τ_1, the paper's sampling-time clip (§6):
    the noise added there reaches the output. It applies to every method, as in the
    paper's Table 2 (App. F.2 clips p(x_1|x_2) for the baselines too); for DDIM
    (σ² = 0) it changes nothing.
    ``fit``, ``gamma_stderr`` (the Γ file's standard errors, the ``weighted`` fit's weights): see
    :func:`covariance_estimate`. ``moments`` (residual methods) and
    ``direction`` (residual-ddim's DDIM direction): see :mod:`residual`.
    """
    tau = _checked_trajectory(schedule, trajectory, method, gamma, moments, eta)
    s, t = tau[:-1][::-1], tau[1:][::-1]
    ddpm = is_ddpm_family(method)
    tilde = step_coefficients(schedule, s, t)["tilde"]  # β̃_{s|t}
    coef = step_coefficients(schedule, s, t, tilde if ddpm else eta**2 * tilde)
    lam2 = coef["lam2"]
    if method in RESIDUAL_METHODS:
        needs_bc = method == "residual-ddim" and direction == "network"
        moments.require(t, "this trajectory's steps", "abc" if needs_bc else "a")
    if ddpm:
        cov = None
        if method == "analytic-ddpm":
            cov = _covariance_on_steps(schedule, gamma, t, data_range, fit, gamma_stderr)
        a_t = None if moments is None else moments.a[t]
        sigma2 = ddpm_family_sigma2(method, coef, cov, a_t, data_range)
    elif method == "ddim":
        sigma2 = lam2.copy()
    elif method == "analytic-ddim":
        cov = _covariance_on_steps(schedule, gamma, t, data_range, fit, gamma_stderr)
        sigma2 = lam2 + ddim_gamma2(schedule, s, t, lam2) * cov
    else:
        sigma2 = _residual_ddim_sigma2(schedule, s, t, lam2, moments, direction, data_range)
    if clip_pixel is not None:
        last = s == tau[0]
        sigma2[last] = np.minimum(sigma2[last], pixel_clip_bound(clip_pixel))
    return StepVariances(method, s, t, lam2, sigma2)


def _checked_trajectory(schedule, trajectory, method, gamma, moments, eta) -> np.ndarray:
    """τ as int64 after every argument check of :func:`step_variances` (ValueError naming it)."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {list(METHODS)}")
    tau = np.asarray(trajectory, dtype=np.int64)
    n = schedule.num_timesteps
    if tau.ndim != 1 or tau.shape[0] < 2 or tau[0] != 1 or tau[-1] != n or np.any(np.diff(tau) <= 0):
        raise ValueError(f"trajectory must increase strictly from 1 to N={n}; got {tau.tolist()[:8]}…")
    if method in ANALYTIC_METHODS and gamma is None:
        raise ValueError(f"method '{method}' needs Γ (a Γ file)")
    if method in RESIDUAL_METHODS and moments is None:
        raise ValueError(f"method '{method}' needs the model-error moments (a Γ file of format 2)")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return tau


def _residual_ddim_sigma2(schedule, s, t, lam2, moments, direction, data_range) -> np.ndarray:
    """λ² + E‖μ̃ − μ_θ‖²/d for DDIM steps; Theorem 2's cap applies to the x̂₀ direction,
    whose γ² it bounds (the network direction's error has no such bound)."""
    upper = None
    if direction != "network":
        upper = lam2 + ddim_gamma2(schedule, s, t, lam2) * ((data_range[1] - data_range[0]) / 2.0) ** 2
    return kl_optimal_variance(lam2, mean_error(schedule, s, t, moments, "ddim", lam2, direction), upper)


def _covariance_on_steps(schedule, gamma, t, data_range, fit, gamma_stderr) -> np.ndarray:
    """:func:`covariance_estimate` at the steps' sources t; ValueError naming missing Γ_t."""
    cov = covariance_estimate(schedule, gamma, data_range, fit, gamma_stderr)
    missing = np.unique(t[~np.isfinite(cov[t])])
    if missing.size:
        raise ValueError(
            f"Γ is missing at timesteps {_describe_timesteps(missing)} that this trajectory "
            "steps from; run the Γ job with --timesteps covering them (or 'all')")
    return cov[t]
