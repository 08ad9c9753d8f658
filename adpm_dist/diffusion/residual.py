"""The model's own error: KL-optimal variances, expected step KLs, the predicted NELBO.

Analytic-DPM's σ² assumes the optimal ε*; a trained ε_θ is not optimal. For a step s → t
with reverse p(x_s|x_t) = N(μ_θ(x_t), σ² I) and forward posterior q(x_s|x_t, x₀) =
N(μ̃(x_t, x₀), λ² I) the expected KL per dimension is (paper Eq. 3's terms, Gaussian KL)

    ½ [log(σ²/λ²) + λ²/σ² − 1 + m/σ²],      m = E‖μ̃ − μ_θ‖²/d,

minimised at σ*² = λ² + m, where it equals ½ log(σ*²/λ²). With x̂₀ᶜ the (clipped)
x̂₀ the mean uses and ε̂ the network output, per timestep t (docs/architecture.md):

    A_t = E‖x₀ − x̂₀ᶜ‖²/d,  B_t = E⟨x₀ − x̂₀ᶜ, ε − ε̂⟩/d,  C_t = E‖ε − ε̂‖²/d.

- DDPM family (μ_θ = μ̃(x_t, x̂₀ᶜ)): m = γ² A_t, γ² = ᾱ_s β_{t|s}²/β̄_t² (paper Eq. 14).
- DDIM family, direction = the network's ε̂ (official code, diffusers' default):
  m = ᾱ_s A_t + 2√ᾱ_s c B_t + c² C_t with c = √(β̄_s − λ²).
- DDIM family, direction re-derived from x̂₀ᶜ: m = γ²_DDIM A_t (paper Eq. 9's γ).

For ε* without clipping A_t = (β̄_t/ᾱ_t)(1 − Γ_t) and γ² A_t is Analytic-DPM's own term
(Thm. 1), so σ*² reduces to the paper's optimum. Nothing here calls a network: the
moments come from the Γ job's one pass over data.

Where it comes from: σ*² = λ² + γ²A_t (``residual-ddpm``) is the scalar, state-independent
case of the NPR-DPM variance of Bao et al., ICML 2022, "Estimating the optimal covariance
with imperfect mean in diffusion probabilistic models" (there E[‖ε − ε̂‖² | x_t] is fitted by
a second network; here its mean over x_t is one number per t). The expected-KL cost matrix
(:func:`expected_cost_matrix`) extends the official Analytic-DPM code's NELBO-term
trajectory from the perfect-model KL to each method's KL under the measured error.
"KL-optimal" holds where σ*² is used as is: :func:`ddpm_family_sigma2` caps residual-ddpm's
σ² at Theorem 2's bound λ² + γ²((b−a)/2)², which binds where A_t > ((b−a)/2)²
(:func:`adpm_dist.diffusion.limit.cap_binds`); there σ² is below σ*² and the step KL above
its minimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from adpm_dist.diffusion.schedule import Schedule

DIRECTIONS = ("network", "x0")  # DDIM: ε̂ from the network, or re-derived from x̂₀ᶜ


@dataclass(frozen=True)
class ErrorMoments:
    """Per-timestep moments of the model's error, arrays indexed t = 0..N (NaN: not estimated).

    ``x0_sq`` is E‖x₀‖²/d (the prior term); ``decoder_nll`` is E[−log p(x₀|x₁)]/d in nats
    for the decoder :mod:`likelihood` uses. ``*_stderr`` are standard errors (may be None).
    """

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    x0_sq: float = math.nan
    decoder_nll: float = math.nan
    a_stderr: np.ndarray | None = None
    x0_sq_stderr: float = 0.0
    decoder_nll_stderr: float = 0.0

    def require(self, timesteps, what: str = "these steps", fields: str = "a") -> None:
        """ValueError naming the timesteps where a moment in ``fields`` ('a', 'abc') is missing."""
        t = np.unique(np.asarray(timesteps, dtype=np.int64))
        known = np.logical_and.reduce([np.isfinite(getattr(self, f)[t]) for f in fields])
        bad = t[~known]
        if bad.size:
            raise ValueError(f"the model-error moments are missing at t = {bad[:8].tolist()} that {what} "
                             "need; run the Γ job with --timesteps covering them")


def step_coefficients(schedule: Schedule, s, t, lam2=None) -> dict[str, np.ndarray]:
    """λ², β_{t|s}, the DDPM γ² and the DDIM c for steps s → t (arrays, float64).

    ``lam2`` None: the DDPM posterior variance β̃_{s|t} = β̄_s β_{t|s}/β̄_t.
    """
    s, t = np.asarray(s, dtype=np.int64), np.asarray(t, dtype=np.int64)
    abar, bbar = schedule.alphas_cumprod, schedule.bar_betas
    beta_ts = 1.0 - abar[t] / abar[s]
    tilde = bbar[s] * beta_ts / bbar[t]
    lam2 = tilde if lam2 is None else np.asarray(lam2, dtype=np.float64)
    return {"lam2": lam2, "beta_ts": beta_ts, "tilde": tilde,
            "gamma2_ddpm": abar[s] * beta_ts**2 / bbar[t] ** 2,
            "c": np.sqrt(np.maximum(bbar[s] - lam2, 0.0))}


def ddim_gamma2(schedule: Schedule, s, t, lam2) -> np.ndarray:
    """γ²_DDIM = (√ᾱ_s − √((β̄_s − λ²) ᾱ_t/β̄_t))² (paper Eq. 9)."""
    abar, bbar = schedule.alphas_cumprod, schedule.bar_betas
    return (np.sqrt(abar[s]) - np.sqrt((bbar[s] - lam2) * abar[t] / bbar[t])) ** 2


def mean_error(schedule: Schedule, s, t, moments: ErrorMoments, family: str = "ddpm",
               lam2=None, direction: str = "network") -> np.ndarray:
    """m = E‖μ̃ − μ_θ‖²/d for steps s → t (module doc); ``family`` 'ddpm' or 'ddim'."""
    s, t = np.asarray(s, dtype=np.int64), np.asarray(t, dtype=np.int64)
    k = step_coefficients(schedule, s, t, lam2)
    a = moments.a[t]
    if family == "ddpm":
        return k["gamma2_ddpm"] * a
    if family != "ddim":
        raise ValueError(f"family must be 'ddpm' or 'ddim', not {family!r}")
    if direction == "x0":
        return ddim_gamma2(schedule, s, t, k["lam2"]) * a
    if direction != "network":
        raise ValueError(f"direction must be one of {list(DIRECTIONS)}, not {direction!r}")
    abar_s, c = schedule.alphas_cumprod[s], k["c"]
    return abar_s * a + 2.0 * np.sqrt(abar_s) * c * moments.b[t] + c**2 * moments.c[t]


def kl_optimal_variance(lam2, mean_err, upper=None) -> np.ndarray:
    """σ*² = λ² + m, the minimiser of the expected step KL; ``upper`` caps it (a safeguard).

    No lower clip is needed: m ≥ 0, so σ*² ≥ λ². (For η = 0 DDIM, λ² = 0 and σ*² = m.)
    """
    sigma2 = np.asarray(lam2, dtype=np.float64) + np.maximum(np.asarray(mean_err, dtype=np.float64), 0.0)
    return sigma2 if upper is None else np.minimum(sigma2, upper)


def expected_step_kl(lam2, sigma2, mean_err) -> np.ndarray:
    """½[log(σ²/λ²) + λ²/σ² − 1 + m/σ²] nats per dimension (module doc); needs λ² > 0."""
    lam2, sigma2 = np.asarray(lam2, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    return 0.5 * (np.log(sigma2 / lam2) + lam2 / sigma2 - 1.0 + np.asarray(mean_err) / sigma2)


def prior_kl(schedule: Schedule, x0_sq: float) -> float:
    """E KL(q(x_N|x₀) ‖ N(0, I))/d = ½[ᾱ_N E‖x₀‖²/d + β̄_N − 1 − log β̄_N] nats."""
    n = schedule.num_timesteps
    abar, bbar = float(schedule.alphas_cumprod[n]), float(schedule.bar_betas[n])
    return 0.5 * (abar * x0_sq + bbar - 1.0 - math.log(bbar))


def predicted_nelbo(schedule: Schedule, s, t, lam2, sigma2, moments: ErrorMoments) -> tuple[float, float]:
    """Expected −ELBO in bits/dim of a DDPM-family method, and its standard error.

    −ELBO/d = prior + Σ steps + decoder (paper Eq. 3 on the trajectory; the steps s → t
    as :class:`~adpm_dist.diffusion.analytic.StepVariances` lists them, σ² the method's).
    The standard error propagates those of A_t, E‖x₀‖²/d and the decoder term with σ²
    held fixed (exact to first order for σ*², where ∂KL/∂σ² = 0), treating the terms as
    independent — the same x₀ enter every t, so it is an approximation.
    """
    s, t = np.asarray(s, dtype=np.int64), np.asarray(t, dtype=np.int64)
    moments.require(t, "the trajectory's steps")
    for name in ("x0_sq", "decoder_nll"):
        if not math.isfinite(getattr(moments, name)):
            hint = " (the decoder term needs the Γ job to cover t = 1)" if name == "decoder_nll" else ""
            raise ValueError(f"the model-error moments lack {name}{hint}")
    m = mean_error(schedule, s, t, moments, "ddpm", lam2)
    steps = expected_step_kl(lam2, sigma2, m)
    total = prior_kl(schedule, moments.x0_sq) + float(np.sum(steps)) + moments.decoder_nll
    prior_slope = 0.5 * float(schedule.alphas_cumprod[-1])  # ∂prior/∂(E‖x₀‖²/d)
    var = (prior_slope * moments.x0_sq_stderr) ** 2 + moments.decoder_nll_stderr**2
    if moments.a_stderr is not None:
        gamma2 = step_coefficients(schedule, s, t, lam2)["gamma2_ddpm"]
        var += float(np.sum((0.5 * gamma2 / sigma2 * moments.a_stderr[t]) ** 2))
    return total / math.log(2.0), math.sqrt(var) / math.log(2.0)


DDPM_RULES = ("ddpm-beta", "ddpm-tilde", "analytic-ddpm", "residual-ddpm")


def ddpm_family_sigma2(method: str, coef: dict, cov_t=None, a_t=None, data_range=(-1.0, 1.0)) -> np.ndarray:
    """σ² of a DDPM-family method from :func:`step_coefficients` (any array shape).

    ``cov_t``: Analytic-DPM's feasible covariance estimate at t (analytic-ddpm);
    ``a_t``: A_t (residual-ddpm, capped at Theorem 2's bound λ² + γ²((b−a)/2)² as a
    safeguard against a noisy A_t; the KL-optimal σ² of a model near the optimum is inside it).
    """
    lam2, gamma2 = coef["lam2"], coef["gamma2_ddpm"]
    if method == "ddpm-beta":
        return np.array(coef["beta_ts"], dtype=np.float64)
    if method == "ddpm-tilde":
        return np.array(lam2, dtype=np.float64)
    if method == "analytic-ddpm":
        return lam2 + gamma2 * cov_t
    if method == "residual-ddpm":
        upper = lam2 + gamma2 * ((data_range[1] - data_range[0]) / 2.0) ** 2
        return kl_optimal_variance(lam2, gamma2 * a_t, upper)
    raise ValueError(f"not a DDPM-family method: {method!r}; choose one of {list(DDPM_RULES)}")


def expected_cost_matrix(schedule: Schedule, method: str, moments: ErrorMoments, cov=None,
                         data_range=(-1.0, 1.0)) -> np.ndarray:
    """C[s, t] = the expected KL (nats/dim) of step s → t under ``method``'s σ², +inf off 1 ≤ s < t ≤ N.

    Every entry follows from N-vectors (A_t, and the covariance estimate for
    analytic-ddpm), so the DP of :func:`~adpm_dist.diffusion.trajectory.least_cost_path`
    minimises each method's actual expected NELBO: the prior and decoder terms do not
    depend on the trajectory (τ_1 = 1, τ_K = N). For ddpm-beta this is the paper's
    "β OT" baseline (Table 1), found without N passes over data.
    """
    n = schedule.num_timesteps
    moments.require(np.arange(2, n + 1), "every step of the DP")
    idx = np.arange(1, n + 1)
    s, t = np.broadcast_arrays(idx[:, None], idx[None, :])
    upper = s < t
    s_u, t_u = s[upper], t[upper]
    coef = step_coefficients(schedule, s_u, t_u)
    cov_t = None if cov is None else np.asarray(cov, dtype=np.float64)[t_u]
    sigma2 = ddpm_family_sigma2(method, coef, cov_t, moments.a[t_u], data_range)
    out = np.full((n + 1, n + 1), np.inf)
    out[s_u, t_u] = expected_step_kl(coef["lam2"], sigma2, coef["gamma2_ddpm"] * moments.a[t_u])
    return out
