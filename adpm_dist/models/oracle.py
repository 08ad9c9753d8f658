"""Exact ε* for isotropic Gaussian mixtures: the oracle every test and the demo stand on.

Data x₀ ~ Σ_k π_k N(m_k, s_k² I) in d dimensions. Under q, x_n | k ~
N(√ᾱ_n m_k, v_k I) with v_k = ᾱ_n s_k² + β̄_n, so the Bayes-optimal noise
predictor (the minimiser of the ε-MSE, i.e. an exact model) is

    ε*(x_n, n) = E[ε | x_n] = Σ_k w_k(x_n) √β̄_n (x_n − √ᾱ_n m_k) / v_k,

with posterior weights w_k ∝ π_k N(x_n; √ᾱ_n m_k, v_k I). All in float64.

``eps_scale`` k and ``eps_offset`` o make a deliberately *imperfect* model ε̂ = k·ε* + o
(o added to every coordinate), for tests of the model-error moments against exact values;
they enter the config (and so the checkpoint and its digest) only when not 1 and 0, so the
exact oracle's config and output are what they were.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from adpm_dist.diffusion.schedule import Schedule, make_schedule


class GaussianMixtureEps(nn.Module):
    """An ε-network with no parameters whose output is the exact ε* of a mixture.

    ``shape`` is the per-sample shape (e.g. (2,) or (1, 8, 8)); d = its product;
    ``eps_scale``/``eps_offset``: the output is eps_scale·ε* + eps_offset (module doc).
    """

    def __init__(self, means, stds, weights, schedule: dict, shape=None, eps_scale: float = 1.0,
                 eps_offset: float = 0.0):
        super().__init__()
        means = np.asarray(means, dtype=np.float64)
        if means.ndim != 2:
            raise ValueError("means must be a (components, d) array")
        stds = np.asarray(stds, dtype=np.float64).reshape(-1)
        weights = np.asarray(weights, dtype=np.float64).reshape(-1)
        k, d = means.shape
        if stds.shape[0] != k or weights.shape[0] != k or np.any(stds <= 0) or np.any(weights <= 0):
            raise ValueError("need one positive std and one positive weight per component")
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not have d={d} entries")
        self.schedule = _schedule_from(schedule)
        self.config = {
            "type": "gaussian-mixture",
            "means": means.tolist(),
            "stds": stds.tolist(),
            "weights": (weights / weights.sum()).tolist(),
            "schedule": dict(schedule),
            "shape": list(self.shape),
        }
        self.eps_scale, self.eps_offset = float(eps_scale), float(eps_offset)
        if not (math.isfinite(self.eps_scale) and math.isfinite(self.eps_offset)):
            raise ValueError("eps_scale and eps_offset must be finite numbers")
        if (self.eps_scale, self.eps_offset) != (1.0, 0.0):  # the exact oracle's config stays as it was
            self.config.update(eps_scale=self.eps_scale, eps_offset=self.eps_offset)
        self.register_buffer("means", torch.as_tensor(means))
        self.register_buffer("stds", torch.as_tensor(stds))
        self.register_buffer("log_weights", torch.as_tensor(np.log(weights / weights.sum())))
        self.register_buffer("abar", torch.tensor(np.array(self.schedule.alphas_cumprod)))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        abar = self.abar[n.to(self.abar.device)].to(flat.device)[:, None]  # (B, 1)
        var = abar * self.stds[None, :] ** 2 + (1.0 - abar)  # (B, K)
        centred = flat[:, None, :] - abar.sqrt()[:, :, None] * self.means[None]  # (B, K, d)
        sq = centred.pow(2).sum(dim=2)
        log_post = self.log_weights[None] - 0.5 * sq / var - 0.5 * self.dim * torch.log(var)
        w = torch.softmax(log_post, dim=1)
        eps = ((w / var)[:, :, None] * centred).sum(dim=1) * (1.0 - abar).sqrt()
        if (self.eps_scale, self.eps_offset) != (1.0, 0.0):
            eps = self.eps_scale * eps + self.eps_offset
        return eps.reshape(x.shape).to(out_dtype)

    def sample_data(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """count draws of x₀ (float64), shaped (count, *shape)."""
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        cdf = torch.cumsum(self.log_weights.exp(), 0)
        comp = torch.searchsorted(cdf, u * cdf[-1]).clamp(max=len(cdf) - 1)
        z = torch.randn(count, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp][:, None] * z
        return x.reshape((count, *self.shape))


def _schedule_from(spec: dict) -> Schedule:
    if "betas" in spec:
        return make_schedule(spec.get("name", "custom"), betas=spec["betas"])
    return make_schedule(spec["name"], spec["num_timesteps"])


def two_cluster_mixture(d: int, schedule: dict, separation: float = 0.5, std: float = 0.15,
                        weights=(0.3, 0.7), eps_scale: float = 1.0,
                        eps_offset: float = 0.0) -> GaussianMixtureEps:
    """Two isotropic clusters at ±separation along the first axis: the standard test oracle
    (``eps_scale``/``eps_offset``: an imperfect one, see the module doc)."""
    means = np.zeros((2, d))
    means[0, 0], means[1, 0] = -separation, separation
    return GaussianMixtureEps(means, [std, std], list(weights), schedule, eps_scale=eps_scale,
                              eps_offset=eps_offset)
