"""The forward process q(x_n | x₀) = N(√ᾱ_n x₀, β̄_n I) (paper Eq. 1; DDPM Eq. 4).

The ONE place that noises data: training's loss, the Γ job, the in-memory
estimator, the likelihood and the benchmarks all call :func:`q_sample`.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from adpm_dist.diffusion.schedule import Schedule

# (id(schedule), device) -> ᾱ_0..ᾱ_N in float64 on that device; dropped with the schedule.
_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def abar_table(schedule: Schedule, device: torch.device | str) -> torch.Tensor:
    """ᾱ_0..ᾱ_N as a float64 tensor on ``device``, uploaded once per schedule and device, so
    that indexing it with timesteps on the device needs no host round trip."""
    device = torch.device(device)
    key = (id(schedule), device)
    table = _TABLES.get(key)
    if table is None:
        table = torch.from_numpy(np.array(schedule.alphas_cumprod, dtype=np.float64)).to(device)
        _TABLES[key] = table
        weakref.finalize(schedule, _TABLES.pop, key, None)
    return table


def q_sample(schedule: Schedule, x0: torch.Tensor, n: torch.Tensor, noise: torch.Tensor):
    """x_n = √ᾱ_n x₀ + √β̄_n ε for per-sample timesteps n (float64 coefficients, computed on
    the device of ``x0``: no host sync)."""
    abar = abar_table(schedule, x0.device)[n.to(x0.device)]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = abar.sqrt().to(x0.dtype).reshape(shape)
    b = (1.0 - abar).sqrt().to(x0.dtype).reshape(shape)
    return a * x0 + b * noise
