"""The forward process q(x_n | x₀) = N(√ᾱ_n x₀, β̄_n I) (paper Eq. 1; DDPM Eq. 4).

The ONE place that noises data: training's loss, the Γ job, the in-memory
estimator, the likelihood and the benchmarks all call :func:`q_sample`.
"""

from __future__ import annotations

import numpy as np
import torch

from adpm_dist.diffusion.schedule import Schedule


def q_sample(schedule: Schedule, x0: torch.Tensor, n: torch.Tensor, noise: torch.Tensor):
    """x_n = √ᾱ_n x₀ + √β̄_n ε for per-sample timesteps n (float64 coefficients)."""
    abar = torch.tensor(np.array(schedule.alphas_cumprod))[n.cpu()]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = abar.sqrt().to(x0.device, x0.dtype).reshape(shape)
    b = (1.0 - abar).sqrt().to(x0.device, x0.dtype).reshape(shape)
    return a * x0 + b * noise
