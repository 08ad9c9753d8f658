"""The model's likelihood limit from one Γ pass: the N-step and the continuous-time negative ELBO.

Everything here follows from the Γ file's model-error moments (A_t per timestep, E‖x₀‖²/d,
the decoder term; :mod:`~adpm_dist.diffusion.residual`); no network is called.

**The N-step limit** (``n_step_limit``, what ``plan`` calls *the limit*). A discrete-time
ε-model is defined at t = 1..N only, so K ≤ N and the finest trajectory is every timestep,
τ = (1, 2, …, N). On it, with the KL-optimal isotropic variance σ*² = λ² + γ²A_t (``residual-
ddpm``), the step s = t−1 → t costs ½ log(σ*²/λ²) = ½ log(1 + (SNR_s − SNR_t) A_t) nats/dim
(γ²/λ² = ᾱ_s β_{t|s}/(β̄_s β̄_t) = SNR_s − SNR_t, SNR = ᾱ/β̄), and

    L_N = prior + Σ_{t=2..N} ½ log(1 + (SNR_{t−1} − SNR_t) A_t) + decoder      (nats/dim).

No isotropic variance rule does better on any trajectory of this model to first order: it is
the bound ``evaluate nll --steps N --methods residual-ddpm`` measures. (Where Theorem 2's cap
binds — A_t above ((b−a)/2)² = 1, an x̂₀ error larger than the data range allows an optimal
model — ``residual-ddpm`` caps σ² and is no longer KL-optimal; ``cap_binds`` lists those t.)

**The continuous-time limit** (``continuous_limit``; Kingma et al. 2021, *Variational
Diffusion Models*, Eq. 17 with x̂ = x̂₀): for a step size going to 0 the step KL
½ log(1 + ΔSNR·A) → ½ ΔSNR·A (and the posterior-variance rule's ½ ΔSNR·A too, VDM Eq. 13), so

    L_∞ = prior + ½ ∫_{SNR_N}^{SNR_1} A(SNR) dSNR + decoder
        = prior + ½ ∫_{λ_N}^{λ_1} SNR·A dλ + decoder,   λ = log SNR,

which for an unclipped x̂₀ (SNR·A_raw = C_t = E‖ε − ε̂‖²/d) is VDM's ε-form ½ ∫ C dλ. It is the
NELBO of a continuous-time model that agrees with ε_θ at the N grid points, integrated by the
trapezoid rule in λ (exact where SNR·A is linear in λ between nodes). For an exact model
(A = E tr Cov[x₀|x_t]/d) the integral is the I-MMSE identity (Guo, Shamai & Verdú 2005):
½ ∫ SNR·A dλ = [I(x₀; x_1) − I(x₀; x_N)]/d, and L_N ≥ L_∞ − KL(q(x_N) ‖ N(0, I))/d (the
discrete chain's Gaussian steps can only lose; on Gaussian data they are exact and L_N = L_∞).
For an imperfect model neither bounds the other in general; L_N − L_∞ is what the time grid
costs (mostly near t = 1, where the linear schedule's λ steps are ~0.8).

Standard errors propagate those of A_t, E‖x₀‖²/d and the decoder term (delta method), treating
timesteps as independent: the same x₀ enter every t, so they are approximations (module doc of
:func:`~adpm_dist.diffusion.residual.predicted_nelbo`). Bits/dim throughout (nats / log 2).
"""

from __future__ import annotations

import math

import numpy as np

from adpm_dist.diffusion.residual import (
    ErrorMoments,
    ddpm_family_sigma2,
    predicted_nelbo,
    prior_kl,
    step_coefficients,
)
from adpm_dist.diffusion.schedule import Schedule

LN2 = math.log(2.0)


def log_snr(schedule: Schedule) -> np.ndarray:
    """λ_t = log(ᾱ_t/β̄_t) for t = 0..N (index 0: +inf, clean data)."""
    abar, bbar = schedule.alphas_cumprod, schedule.bar_betas
    with np.errstate(divide="ignore"):
        return np.log(abar) - np.log(bbar)


def full_chain(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """The steps s → t of τ = (1, …, N), as StepVariances lists them (t descending)."""
    t = np.arange(schedule.num_timesteps, 1, -1)
    return t - 1, t


def n_step_sigma2(schedule: Schedule, moments: ErrorMoments, data_range=(-1.0, 1.0)) -> dict:
    """s, t, λ² and the KL-optimal σ² (``residual-ddpm``'s rule, capped at Theorem 2's bound) of
    every step of τ = (1, …, N)."""
    s, t = full_chain(schedule)
    moments.require(t, "the N-step limit")
    coef = step_coefficients(schedule, s, t)
    sigma2 = ddpm_family_sigma2("residual-ddpm", coef, a_t=moments.a[t], data_range=data_range)
    return {"s": s, "t": t, "lambda2": coef["lam2"], "sigma2": sigma2}


def cap_binds(moments: ErrorMoments, data_range=(-1.0, 1.0)) -> np.ndarray:
    """Timesteps t where A_t exceeds ((b−a)/2)², so Theorem 2's cap binds and the capped σ² is not
    the KL-optimal one (module doc)."""
    bound = ((data_range[1] - data_range[0]) / 2.0) ** 2
    a = np.nan_to_num(moments.a, nan=-np.inf)
    return np.flatnonzero(a > bound)


def n_step_limit(schedule: Schedule, moments: ErrorMoments, sigma2=None,
                 data_range=(-1.0, 1.0)) -> tuple[float, float]:
    """(L_N, s.e.) in bits/dim (module doc). ``sigma2`` (per step of :func:`full_chain`) replaces
    the variances chosen from ``moments`` — for a cross-fitted value, σ² chosen on the other half."""
    steps = n_step_sigma2(schedule, moments, data_range)
    var = steps["sigma2"] if sigma2 is None else np.asarray(sigma2, dtype=np.float64)
    return predicted_nelbo(schedule, steps["s"], steps["t"], steps["lambda2"], var, moments)


def diffusion_integral(schedule: Schedule, a, a_stderr=None) -> tuple[float, float]:
    """½ ∫_{λ_N}^{λ_1} SNR·A dλ nats/dim by the trapezoid rule on the grid t = 1..N, and its s.e.
    ``a``, ``a_stderr``: length N+1 (index 0 unused); every t in 1..N is needed."""
    n = schedule.num_timesteps
    a = np.asarray(a, dtype=np.float64)[1:]
    if not np.all(np.isfinite(a)):
        bad = (np.flatnonzero(~np.isfinite(a))[:8] + 1).tolist()
        raise ValueError(f"the continuous limit needs A_t at every t; missing at t = {bad}")
    lam = log_snr(schedule)[1:]
    f = np.exp(lam) * a  # SNR·A (= C_t for an unclipped x̂₀)
    widths = lam[:-1] - lam[1:]  # λ decreases with t
    weights = np.zeros(n)
    weights[:-1] += 0.5 * widths
    weights[1:] += 0.5 * widths
    value = 0.5 * float(np.sum(weights * f))
    if a_stderr is None:
        return value, 0.0
    se = 0.5 * np.sqrt(np.sum((weights * np.exp(lam) * np.asarray(a_stderr, dtype=np.float64)[1:]) ** 2))
    return value, float(se)


def continuous_limit(schedule: Schedule, moments: ErrorMoments) -> dict:
    """L_∞ in bits/dim with its parts (prior, diffusion, decoder) and s.e. (module doc)."""
    diffusion, diffusion_se = diffusion_integral(schedule, moments.a, moments.a_stderr)
    prior = prior_kl(schedule, moments.x0_sq)
    if not (math.isfinite(prior) and math.isfinite(moments.decoder_nll)):
        raise ValueError("the continuous limit needs E‖x₀‖²/d and the decoder term (the Γ job at t = 1)")
    prior_se = 0.5 * float(schedule.alphas_cumprod[-1]) * moments.x0_sq_stderr
    total = prior + diffusion + moments.decoder_nll
    se = math.sqrt(diffusion_se**2 + prior_se**2 + moments.decoder_nll_stderr**2)
    return {"bpd": total / LN2, "stderr": se / LN2, "prior_bpd": prior / LN2,
            "diffusion_bpd": diffusion / LN2, "decoder_bpd": moments.decoder_nll / LN2}


__all__ = ["cap_binds", "continuous_limit", "diffusion_integral", "full_chain", "log_snr", "n_step_limit",
           "n_step_sigma2"]
