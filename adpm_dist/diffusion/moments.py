"""Monte-Carlo estimates of Γ_n = E‖ε_θ(x_n, n)‖²/d (paper Eq. 11, the ms_eps form).

The same kernel serves the in-memory estimator here (demo, tests) and the
sharded job (``adpm_dist.stages.estimate``): noise a batch of x₀ at given timesteps and
return each sample's ‖ε_θ‖²/d in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from adpm_dist.diffusion.forward import q_sample
from adpm_dist.diffusion.samplers import EpsFn
from adpm_dist.diffusion.schedule import Schedule


@torch.inference_mode()
def eps_sq_norms(eps_fn: EpsFn, schedule: Schedule, x0, n, noise) -> np.ndarray:
    """‖ε_θ(x_n, n)‖²/d per sample, as float64 NumPy."""
    eps = eps_fn(q_sample(schedule, x0, n, noise), n)
    flat = eps.reshape(eps.shape[0], -1).to(torch.float64)
    return (flat.pow(2).sum(dim=1) / flat.shape[1]).cpu().numpy()


def estimate_gamma(
    eps_fn: EpsFn,
    schedule: Schedule,
    x0: torch.Tensor,
    generator: torch.Generator,
    batch_size: int = 4096,
    timesteps=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Γ_n and its standard error for n in ``timesteps`` (default 1..N), every x₀ at every n.

    Returns length-N+1 arrays (index 0 NaN) — in-memory, for small problems.
    """
    n_all = schedule.num_timesteps
    ts = np.arange(1, n_all + 1) if timesteps is None else np.asarray(timesteps)
    total = np.zeros(n_all + 1)
    total_sq = np.zeros(n_all + 1)
    count = np.zeros(n_all + 1)
    for t in ts:
        for start in range(0, x0.shape[0], batch_size):
            xb = x0[start : start + batch_size]
            noise = torch.randn(xb.shape, generator=generator, dtype=xb.dtype, device=xb.device)
            n = torch.full((xb.shape[0],), int(t), dtype=torch.long, device=xb.device)
            v = eps_sq_norms(eps_fn, schedule, xb, n, noise)
            total[t] += v.sum()
            total_sq[t] += (v * v).sum()
            count[t] += v.size
    gamma = np.full(n_all + 1, np.nan)
    stderr = np.full(n_all + 1, np.nan)
    seen = count > 0
    gamma[seen] = total[seen] / count[seen]
    var = (total_sq[seen] - count[seen] * gamma[seen] ** 2) / np.maximum(count[seen] - 1, 1)
    stderr[seen] = np.sqrt(np.maximum(var, 0) / count[seen])
    return gamma, stderr


__all__ = ["eps_sq_norms", "estimate_gamma"]
