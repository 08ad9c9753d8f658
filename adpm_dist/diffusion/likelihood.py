"""Negative ELBO in bits/dim for the DDPM family on any trajectory.

For a trajectory τ_1 = 1 < … < τ_K = N (paper §3, Eq. 3 on a subsequence):

    −ELBO = KL(q(x_N|x₀) ‖ N(0, I))                                 (prior)
          + Σ_k E_q KL(q(x_{τ_{k−1}}|x_{τ_k}, x₀) ‖ p(x_{τ_{k−1}}|x_{τ_k}))  (steps)
          − E_q log p(x₀|x_{τ_1})                                     (decoder)

q(x_s|x_t, x₀) = N(μ̃(x_t, x₀), β̃_{s|t}); the model's step is N(μ̃(x_t, x̂₀), σ²)
with σ² from :mod:`analytic`. Each expectation is estimated with one x_t per
step and image, drawn from that image's generator. The decoder is the
discretised Gaussian of Ho et al. (2020) for 8-bit data in [−1, 1], bins of
width 2/255, edge bins open, mean x̂₀(x_1) and variance β̃ of the 1 → 2 step
(β̄_1 β_2 / β̄_2; the full chain's β̃_1 is 0, so the next one is used, as in
the paper's likelihood experiments).

Two decoders (``decoder``): ``'exact'`` (default) computes each bin's probability from
Φ by ``log_ndtr`` with the tail that keeps the difference accurate, so a sharp decoder
(σ ≈ 0.01 at t = 1) is scored exactly; ``'official'`` is the official Analytic-DPM
code's (baofff/Analytic-DPM, ``core/func/functions.py``: ``log_discretized_normal``,
from Ho et al.'s code): Φ by the tanh approximation
0.5(1 + tanh(√(2/π)(x + 0.044715x³))) and each bin's probability floored at 1e-12,
which moves the NELBO by 2e-3 to 5e-3 bits/dim. ``--official`` selects it so that the
numbers equal the official ``nelbo_ms_eps_ddpm``; ours stays exact because the
approximation's error (up to ~1e-3 in Φ) is not a property of the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from adpm_dist.diffusion.analytic import DDPM_FAMILY, is_ddpm_family, step_variances
from adpm_dist.diffusion.forward import q_sample
from adpm_dist.diffusion.residual import ErrorMoments
from adpm_dist.diffusion.samplers import EpsFn, per_image_normal, predict_x0, reverse_mean
from adpm_dist.diffusion.schedule import Schedule


def _flat_sum(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def gaussian_kl(mean_q, var_q: float, mean_p, var_p: float) -> torch.Tensor:
    """KL(N(mean_q, var_q I) ‖ N(mean_p, var_p I)) per image, in nats."""
    per_dim = 0.5 * (math.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1.0)
    return _flat_sum(per_dim)


def log_discretized_gaussian(x0: torch.Tensor, mean: torch.Tensor, var: float, bins: int = 256):
    """log P(x₀'s bin) under N(mean, var), 8-bit bins on [−1, 1], edges open; per image."""
    half = 1.0 / (bins - 1)
    sd = math.sqrt(var)
    upper = (x0 + half - mean) / sd
    lower = (x0 - half - mean) / sd
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    # For an inner bin use whichever tail is smaller to keep the difference accurate.
    right = lower > 0
    big = torch.where(right, log_sf_lower, log_cdf_upper)
    small = torch.where(right, torch.special.log_ndtr(-upper), torch.special.log_ndtr(lower))
    inner = big + torch.log1p(-torch.exp(small - big).clamp(max=1.0 - 1e-15))
    edge_lo = x0 < -1.0 + half
    edge_hi = x0 > 1.0 - half
    out = torch.where(edge_lo, log_cdf_upper, torch.where(edge_hi, log_sf_lower, inner))
    return _flat_sum(out)


def log_discretized_gaussian_official(x0: torch.Tensor, mean: torch.Tensor, var: float) -> torch.Tensor:
    """The official code's decoder log-likelihood per image (module doc): tanh-approximated Φ,
    bins of half-width 1/255, the outer bins open below −0.999 and above 0.999, every bin's
    probability floored at 1e-12."""

    def approx_cdf(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

    sd = math.sqrt(var)
    cdf_upper = approx_cdf((x0 - mean + 1.0 / 255.0) / sd)
    cdf_lower = approx_cdf((x0 - mean - 1.0 / 255.0) / sd)
    inner_or_top = torch.where(x0 > 0.999, 1.0 - cdf_lower, cdf_upper - cdf_lower)
    prob = torch.where(x0 < -0.999, cdf_upper, inner_or_top)
    return _flat_sum(prob.clamp(min=1e-12).log())


DECODERS = {"exact": log_discretized_gaussian, "official": log_discretized_gaussian_official}


def negative_elbo(
    eps_fn: EpsFn,
    schedule: Schedule,
    trajectory,
    method: str,
    x0: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    gamma=None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    clip_x0: bool = False,
    moments: ErrorMoments | None = None,
    fit: str = "weighted",
    gamma_stderr=None,
    decoder: str = "exact",
) -> dict[str, torch.Tensor]:
    """Per-image terms of −ELBO in nats (float64) and the total in bits/dim.

    Returns ``prior`` (B,), ``steps`` (B, K−1, ordered from t = N down),
    ``decoder`` (B,), ``total`` (B,) and ``bpd`` (B,).
    """
    return negative_elbos(eps_fn, schedule, trajectory, [method], x0, generators, gamma=gamma,
                          data_range=data_range, clip_x0=clip_x0, moments=moments, fit=fit,
                          gamma_stderr=gamma_stderr, decoder=decoder)[method]


def negative_elbos(
    eps_fn: EpsFn,
    schedule: Schedule,
    trajectory,
    methods: Sequence[str],
    x0: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    gamma=None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    clip_x0: bool = False,
    moments: ErrorMoments | None = None,
    fit: str = "weighted",
    gamma_stderr=None,
    decoder: str = "exact",
) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`negative_elbo` for several DDPM-family methods from ONE set of ε evaluations.

    The methods share the reverse mean (λ² = β̃) and differ only in σ², so each
    step's KL follows from the same x_t and x̂₀: K forward passes per image (K−1 steps
    and the decoder) for any number of methods, and each method's result is exactly what
    :func:`negative_elbo` alone gives with the same generators. ``gamma_stderr``: the Γ file's
    standard errors (the ``weighted`` fit's weights); ``decoder``: module doc."""
    _check(methods, decoder)
    x0 = x0.to(torch.float64)
    batch = x0.shape[0]
    abar, bbar = schedule.alphas_cumprod, schedule.bar_betas
    variances = {m: step_variances(schedule, trajectory, m, gamma=gamma, data_range=data_range,
                                   moments=moments, fit=fit, gamma_stderr=gamma_stderr) for m in methods}
    steps = variances[methods[0]]  # s, t and λ² are the same for every method of the family
    clip = data_range if clip_x0 else None

    def timestep(t: int) -> torch.Tensor:
        return torch.full((batch,), t, dtype=torch.long, device=x0.device)

    def noised(t: int) -> torch.Tensor:
        noise = per_image_normal(generators, x0.shape[1:], torch.float64, x0.device)
        return q_sample(schedule, x0, timestep(t), noise)

    def x0_hat(x_t: torch.Tensor, t: int) -> torch.Tensor:
        pred = predict_x0(schedule, x_t, eps_fn(x_t, timestep(t)).to(torch.float64), t)
        return pred.clamp(*clip) if clip else pred

    n_last = schedule.num_timesteps
    prior_var = float(bbar[n_last])
    prior = gaussian_kl(math.sqrt(abar[n_last]) * x0, prior_var, torch.zeros_like(x0), 1.0)

    step_kls: dict[str, list[torch.Tensor]] = {m: [] for m in methods}  # per method, from t = N down
    for i, (s, t, lam2) in enumerate(zip(steps.s, steps.t, steps.lambda2)):
        s, t = int(s), int(t)
        x_t = noised(t)
        mean_q = reverse_mean(schedule, x_t, x0, s, t, float(lam2))
        mean_p = reverse_mean(schedule, x_t, x0_hat(x_t, t), s, t, float(lam2))
        for m in methods:
            step_kls[m].append(gaussian_kl(mean_q, float(lam2), mean_p, float(variances[m].sigma2[i])))

    x_1 = noised(1)
    dec_var = float(bbar[1] * (1.0 - abar[2] / abar[1]) / bbar[2])
    dec_nll = -DECODERS[decoder](x0, x0_hat(x_1, 1), dec_var)
    return {m: _terms(prior, step_kls[m], dec_nll, x0[0].numel()) for m in methods}


def _check(methods: Sequence[str], decoder: str) -> None:
    for method in [m for m in methods if not is_ddpm_family(m)]:
        raise ValueError(f"the ELBO is defined for the DDPM family {list(DDPM_FAMILY)}, not '{method}'")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {list(DECODERS)}")


def _terms(prior: torch.Tensor, step_kls: list[torch.Tensor], decoder: torch.Tensor,
           dims: int) -> dict[str, torch.Tensor]:
    """The per-image terms of one method, and their total in nats and bits/dim."""
    steps_t = torch.stack(step_kls, dim=1)
    total = prior + steps_t.sum(dim=1) + decoder
    return {"prior": prior, "steps": steps_t, "decoder": decoder, "total": total,
            "bpd": total / (dims * math.log(2.0))}
