"""One reverse loop for every method (DDPM-, DDIM- and Analytic-family).

Samplers are pure functions of an ``eps_fn(x, n) -> ε̂`` (n = 1..N, a LongTensor
of the batch size) and of per-image noise: a list of ``torch.Generator``s (noise stream 1)
or a :class:`~adpm_dist.diffusion.noise.CounterNoise` (stream 2, one draw per batch). Image
i's starting noise and every noise it receives come from its own seed alone, so the output
for an image does not depend on which batch or rank it was drawn in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from adpm_dist.diffusion.analytic import StepVariances, is_ddpm_family, step_variances
from adpm_dist.diffusion.residual import ErrorMoments
from adpm_dist.diffusion.schedule import Schedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_generators(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per image, seeded by that image's own seed."""
    gens = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(seed))
        gens.append(g)
    return gens


def per_image_normal(generators, shape, dtype, device, step: int = 0) -> torch.Tensor:
    """A (len(generators), *shape) standard normal tensor, row i drawn from generator i.

    ``generators`` may instead be a noise source with ``normal(shape, dtype, device, step)``
    (:class:`~adpm_dist.diffusion.noise.CounterNoise`, noise stream 2: the whole batch in one
    draw, row i a function of image i's seed and ``step`` alone); generators ignore ``step``.
    """
    if hasattr(generators, "normal"):
        return generators.normal(shape, dtype, device, step)
    return torch.stack(
        [torch.randn(tuple(shape), generator=g, dtype=dtype, device=device) for g in generators]
    )


def predict_x0(schedule: Schedule, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """x̂₀ = (x_t − √β̄_t ε̂)/√ᾱ_t (the forward relation solved for x₀)."""
    abar = float(schedule.alphas_cumprod[t])
    return (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)


def reverse_mean(
    schedule: Schedule, x_t: torch.Tensor, x0_hat: torch.Tensor, s: int, t: int, lambda2: float,
    eps_hat: torch.Tensor | None = None,
) -> torch.Tensor:
    """μ = √ᾱ_s x̂₀ + √(β̄_s − λ²)·ε̂ (paper Eq. 9; = μ̃ for λ² = β̃).

    ε̂ None: the direction re-derived from x̂₀, (x_t − √ᾱ_t x̂₀)/√β̄_t; otherwise the given
    one (the network's output: the official code's DDIM step, where x̂₀ is clipped and ε̂ not).
    """
    abar_s, abar_t = float(schedule.alphas_cumprod[s]), float(schedule.alphas_cumprod[t])
    if eps_hat is None:
        eps_hat = (x_t - math.sqrt(abar_t) * x0_hat) / math.sqrt(1.0 - abar_t)
    return math.sqrt(abar_s) * x0_hat + math.sqrt(max(1.0 - abar_s - lambda2, 0.0)) * eps_hat


def run_reverse(
    eps_fn: EpsFn,
    schedule: Schedule,
    steps: StepVariances,
    generators: Sequence[torch.Generator],
    shape: Sequence[int],
    *,
    dtype=torch.float32,
    device="cpu",
    clip_range: tuple[float, float] | None = (-1.0, 1.0),
    progress: Callable[[], None] | None = None,
    direction: str = "network",
    zero_noise: str = "skip",
) -> torch.Tensor:
    """Sample x_N ~ N(0, I) and run every step of ``steps``; the last step returns x̂₀.

    ``clip_range`` clips x̂₀ to the data range before it forms the mean (None: off).
    ``progress`` is called once per network evaluation. ``direction``: the mean's noise
    direction, re-derived from the clipped x̂₀ (``'x0'``) or the network's ε̂
    (``'network'``, the official code and diffusers' ``use_clipped_model_output=False``);
    DDPM-family steps always use the posterior mean μ̃(x_t, x̂₀), i.e. ``'x0'``.
    ``zero_noise``: a step with σ² = 0 draws no noise (``'skip'``) or draws it and multiplies
    it by 0 (``'draw'``, the official code's samplers, e.g. ``reverse_ddim_naive`` in
    baofff/Analytic-DPM ``core/inference/sampler/reverse_ddim.py``), so that same-seed chains
    match the official code's draw for draw.
    """
    if zero_noise not in ("skip", "draw"):
        raise ValueError(f"unknown zero_noise {zero_noise!r}; choose 'skip' or 'draw'")
    x = per_image_normal(generators, shape, dtype, device)
    batch = x.shape[0]

    def predict(x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = torch.full((batch,), t, dtype=torch.long, device=device)
        eps = eps_fn(x_t, n).to(x_t.dtype)
        x0 = predict_x0(schedule, x_t, eps, t)
        if progress is not None:
            progress()
        return (x0.clamp(*clip_range) if clip_range is not None else x0), eps

    network_direction = direction == "network" and not is_ddpm_family(steps.method)
    for k, (s, t, lam2, sig2) in enumerate(zip(steps.s, steps.t, steps.lambda2, steps.sigma2), start=1):
        x0, eps = predict(x, int(t))
        mean = reverse_mean(schedule, x, x0, int(s), int(t), float(lam2), eps if network_direction else None)
        if sig2 > 0 or zero_noise == "draw":
            noise = per_image_normal(generators, shape, dtype, device, k)  # stream 2: step k's noise
            mean = mean + math.sqrt(max(float(sig2), 0.0)) * noise
        x = mean
    # Last step τ_1 → 0: p(x₀|x_{τ_1}) has mean x̂₀(x_{τ_1}); we return the mean, as is usual.
    return predict(x, int(steps.s[-1]))[0]


def sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    trajectory,
    method: str,
    generators: Sequence[torch.Generator],
    shape: Sequence[int],
    *,
    gamma=None,
    eta: float = 0.0,
    data_range: tuple[float, float] = (-1.0, 1.0),
    clip_pixel: float | None = None,
    clip_x0: bool = True,
    dtype=torch.float32,
    device="cpu",
    progress: Callable[[], None] | None = None,
    moments: ErrorMoments | None = None,
    direction: str = "network",
    fit: str = "weighted",
    gamma_stderr=None,
    zero_noise: str = "skip",
) -> torch.Tensor:
    """Draw ``len(generators)`` samples of ``shape`` with any method on any trajectory
    (``fit``, ``gamma_stderr``: :func:`~adpm_dist.diffusion.analytic.covariance_estimate`)."""
    steps = step_variances(
        schedule, trajectory, method, gamma=gamma, eta=eta, data_range=data_range,
        clip_pixel=clip_pixel, moments=moments, direction=direction, fit=fit, gamma_stderr=gamma_stderr,
    )
    return run_reverse(
        eps_fn, schedule, steps, generators, shape, dtype=dtype, device=device,
        clip_range=data_range if clip_x0 else None, progress=progress, direction=direction,
        zero_noise=zero_noise,
    )
