"""Independent truth for the oracle tests: NumPy/SciPy only, no adpm_dist imports.

Two isotropic Gaussian clusters N(±m e₁, s² I) with weights (π, 1−π) in d
dimensions. The posterior weights depend on the first coordinate only, so every
expectation is a 1-D integral (adaptive quadrature) plus a closed form for the
d−1 other coordinates.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate


def abar_from_betas(betas_1_to_n: np.ndarray) -> np.ndarray:
    """ᾱ_n for n = 0..N computed here from the raw β's (index 0: 1)."""
    out = np.ones(len(betas_1_to_n) + 1)
    acc = 1.0
    for i, b in enumerate(betas_1_to_n, start=1):
        acc *= 1.0 - b
        out[i] = acc
    return out


def _axis_pdf_and_eps(x, abar, m, s, w0):
    """Density of x_t's first coordinate and ε*₁(x) there."""
    v = abar * s * s + (1.0 - abar)
    mus = (-m * math.sqrt(abar), m * math.sqrt(abar))
    ws = (w0, 1.0 - w0)
    comps = [wk * math.exp(-0.5 * (x - mk) ** 2 / v) / math.sqrt(2 * math.pi * v) for wk, mk in zip(ws, mus)]
    p = comps[0] + comps[1]
    if p <= 0:
        return 0.0, 0.0, (0.5, 0.5)
    post = (comps[0] / p, comps[1] / p)
    eps = math.sqrt(1.0 - abar) * sum(pk * (x - mk) / v for pk, mk in zip(post, mus))
    return p, eps, post


def exact_gamma(abar: float, d: int, m: float, s: float, w0: float) -> float:
    """Γ = E‖E[ε|x_t]‖²/d for the two-cluster mixture (quadrature on axis 1)."""
    v = abar * s * s + (1.0 - abar)
    other = (1.0 - abar) / v  # each of the d−1 Gaussian coordinates

    def integrand(x):
        p, eps, _ = _axis_pdf_and_eps(x, abar, m, s, w0)
        return p * eps * eps

    span = math.sqrt(abar) * m + 12.0 * math.sqrt(v)
    axis, _ = integrate.quad(integrand, -span, span, limit=400, epsabs=1e-13, epsrel=1e-11,
                             points=[-math.sqrt(abar) * m, math.sqrt(abar) * m])
    return ((d - 1) * other + axis) / d


def exact_posterior_cov(abar: float, d: int, m: float, s: float, w0: float) -> float:
    """E tr Cov[x₀|x_t]/d for the mixture, by the law of total variance on axis 1."""
    v = abar * s * s + (1.0 - abar)
    within = s * s * (1.0 - abar) / v  # Var[x₀ | x_t, component], every coordinate
    means = (-m, m)

    def integrand(x):
        p, _, post = _axis_pdf_and_eps(x, abar, m, s, w0)
        cond = [mk + math.sqrt(abar) * s * s / v * (x - math.sqrt(abar) * mk) for mk in means]
        mean = post[0] * cond[0] + post[1] * cond[1]
        between = post[0] * (cond[0] - mean) ** 2 + post[1] * (cond[1] - mean) ** 2
        return p * between

    span = math.sqrt(abar) * m + 12.0 * math.sqrt(v)
    axis, _ = integrate.quad(integrand, -span, span, limit=400, epsabs=1e-14, epsrel=1e-11,
                             points=[-math.sqrt(abar) * m, math.sqrt(abar) * m])
    return within + axis / d


def gaussian_reverse_variance(abar_s, abar_t, s0_sq, lambda2=None):
    """E Var[x_s | x_t] for x₀ ~ N(μ, s0²) by conditioning the joint Gaussian of (x_s, x_t).

    lambda2=None: the DDPM (Markov) forward chain; otherwise the DDIM(λ) process
    x_s = √ᾱ_s x₀ + √(β̄_s − λ²) ε + λ z with the same ε as x_t = √ᾱ_t x₀ + √β̄_t ε.
    The optimal reverse variance (paper Thm. 1) is exactly this quantity.
    """
    var_s = abar_s * s0_sq + (1.0 - abar_s)
    var_t = abar_t * s0_sq + (1.0 - abar_t)
    if lambda2 is None:
        cov = math.sqrt(abar_t / abar_s) * var_s
    else:
        cov = math.sqrt(abar_s * abar_t) * s0_sq + math.sqrt((1.0 - abar_s - lambda2) * (1.0 - abar_t))
    return var_s - cov * cov / var_t


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sample energy distance 2E|X−Y| − E|X−X'| − E|Y−Y'| (V-statistic)."""

    def mean_dist(a, b):
        return float(np.mean(np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))))

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def exact_gamma_on_data(x0: np.ndarray, abar: float, m: float, s: float, w0: float,
                        nodes: int = 120) -> float:
    """Γ_t = mean_i E_ε‖ε*(√ᾱ x0_i + √β̄ ε)‖²/d for a FIXED data set x0 (n, d).

    ε* is the two-cluster oracle (clusters differ along axis 1 only). Coordinates
    j ≥ 2 enter linearly: E[(√β̄ x_j / v)²] = β̄(ᾱ x0_j² + β̄)/v². Axis 1 is a 1-D
    Gauss–Hermite expectation over ε₁, done once per distinct value of x0_1.
    """
    v = abar * s * s + (1.0 - abar)
    bbar = 1.0 - abar
    d = x0.shape[1]
    others = (bbar * (abar * x0[:, 1:] ** 2 + bbar) / v**2).sum(axis=1)
    z, w = np.polynomial.hermite_e.hermegauss(nodes)  # weight exp(−z²/2)
    w = w / w.sum()
    uniq, inverse = np.unique(x0[:, 0], return_inverse=True)
    x = math.sqrt(abar) * uniq[:, None] + math.sqrt(bbar) * z[None, :]
    mus = np.array([-m, m]) * math.sqrt(abar)
    logp = np.log([w0, 1.0 - w0])[None, None, :] - 0.5 * (x[..., None] - mus) ** 2 / v
    post = np.exp(logp - logp.max(axis=-1, keepdims=True))
    post /= post.sum(axis=-1, keepdims=True)
    eps1 = math.sqrt(bbar) * (post * (x[..., None] - mus)).sum(axis=-1) / v
    axis = (eps1**2 * w[None, :]).sum(axis=1)[inverse]
    return float(np.mean((others + axis) / d))
