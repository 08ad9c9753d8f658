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


# ---------------------------------------------------------------- the model-error moments


def eps_star(x: np.ndarray, abar: float, m: float, s: float, w0: float) -> np.ndarray:
    """ε*(x) of the two-cluster oracle for x (…, d): coordinate 0 carries the clusters; the others
    have mean 0 in both, so there ε*_j = √β̄ x_j / v whatever the posterior weights."""
    v = abar * s * s + (1.0 - abar)
    out = math.sqrt(1.0 - abar) * x / v
    mus = np.array([-m, m]) * math.sqrt(abar)
    x1 = x[..., 0][..., None]
    logp = np.log([w0, 1.0 - w0]) - 0.5 * (x1 - mus) ** 2 / v
    post = np.exp(logp - logp.max(axis=-1, keepdims=True))
    post /= post.sum(axis=-1, keepdims=True)
    out[..., 0] = math.sqrt(1.0 - abar) * (post * (x1 - mus)).sum(axis=-1) / v
    return out


def decoder_nll_scipy(x0: np.ndarray, mean: np.ndarray, var: float) -> np.ndarray:
    """−log P(x₀'s 8-bit bin) under N(mean, var) per element (bins of width 2/255 on [−1, 1], the
    edge bins open), from normal-cdf differences at the bin edges (the smaller tail's, for accuracy)."""
    from scipy import stats

    h, sd = 1.0 / 255.0, math.sqrt(var)
    upper, lower = (x0 + h - mean) / sd, (x0 - h - mean) / sd
    inner = np.where(lower > 0, stats.norm.sf(lower) - stats.norm.sf(upper),
                     stats.norm.cdf(upper) - stats.norm.cdf(lower))
    p = np.where(x0 < -1 + h, stats.norm.cdf(upper), np.where(x0 > 1 - h, stats.norm.sf(lower), inner))
    return -np.log(p)


def exact_error_moments(x0: np.ndarray, abar: float, m: float, s: float, w0: float, scale: float = 1.0,
                        offset: float = 0.0, dec_var: float | None = None, nodes: int = 8001) -> dict:
    """E over the noise, mean over a FIXED data set x0 (n, d), of the per-pair statistics of the
    model ε̂ = scale·ε* + offset: a, a_raw, b, b_raw, c (and, given ``dec_var``, the decoder's
    −log p(x₀|x_t)/d with mean x̂₀ᶜ and x̂₀: decoder_nll, decoder_nll_raw).

    x̂₀ = (x_t − √β̄ ε̂)/√ᾱ literally, x̂₀ᶜ = clip(x̂₀, −1, 1). Each coordinate of ε* depends on that
    coordinate of x_t alone (see :func:`eps_star`), so every statistic is a mean over coordinates of
    1-D expectations over ε_j ~ N(0, 1): a trapezoid rule on [−8, 8] (the clip's kinks cost O(h²)),
    once per distinct value of x0[:, j] (8-bit data: at most 256).
    """
    bbar = 1.0 - abar
    z = np.linspace(-8.0, 8.0, nodes)
    w = np.exp(-0.5 * z * z)
    w[[0, -1]] *= 0.5
    w /= w.sum()
    d = x0.shape[1]
    keys = ["a", "a_raw", "b", "b_raw", "c"] + (["decoder_nll", "decoder_nll_raw"] if dec_var else [])
    total = dict.fromkeys(keys, 0.0)
    for j in range(d):
        uniq, counts = np.unique(x0[:, j], return_counts=True)
        x_t = math.sqrt(abar) * uniq[:, None] + math.sqrt(bbar) * z[None, :]
        full = np.zeros((*x_t.shape, d))  # ε*_j needs x_t's coordinate j (and 0 for j = 0) only
        full[..., j] = x_t
        eps_hat = scale * eps_star(full, abar, m, s, w0)[..., j] + offset
        raw = (x_t - math.sqrt(bbar) * eps_hat) / math.sqrt(abar)
        clipped = np.clip(raw, -1.0, 1.0)
        u, e = uniq[:, None], z[None, :] - eps_hat
        per = {"a": (u - clipped) ** 2, "a_raw": (u - raw) ** 2, "b": (u - clipped) * e,
               "b_raw": (u - raw) * e, "c": e * e}
        if dec_var:
            per["decoder_nll"] = decoder_nll_scipy(np.broadcast_to(u, raw.shape), clipped, dec_var)
            per["decoder_nll_raw"] = decoder_nll_scipy(np.broadcast_to(u, raw.shape), raw, dec_var)
        for k in keys:
            total[k] += float(((per[k] * w).sum(axis=1) * counts).sum()) / x0.shape[0]
    return {k: v / d for k, v in total.items()}
