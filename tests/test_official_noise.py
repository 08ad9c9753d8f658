"""Noise draws where σ² = 0 (issue 23 item 1): in official mode a step with σ² = 0 still draws its
noise (and multiplies it by 0), so same-seed chains match the official code draw for draw.

Independent truth: the official sampler ``reverse_ddim_ms_eps`` (baofff/Analytic-DPM,
cifar_imagenet_codes/core/inference/sampler/reverse_ddim.py) re-written below from its
definition in float64, with per-image generators in place of the global RNG: x_N first, then one
draw at every step but the last, whatever σ² is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adpm_dist.diffusion.analytic import step_variances
from adpm_dist.diffusion.samplers import make_generators, run_reverse
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.diffusion.trajectory import even_trajectory
from adpm_dist.stages.conventions import conventions_from
from adpm_dist.stages.sample_args import build_parser

N, SEEDS, SHAPE = 200, (3, 4, 5), (2, 4, 4)


def toy_eps(x, n):
    scale = (n.to(torch.float64) / N).reshape(-1, 1, 1, 1)
    return torch.tanh(0.8 * x - scale) * (0.6 + 0.4 * scale)


def official_ddim_chain(betas0, ms_eps, ns, gens, eta=0.0):
    def draw():
        return torch.stack([torch.randn(SHAPE, generator=g, dtype=torch.float64) for g in gens])

    alphas = 1.0 - betas0
    cum = alphas.cumprod()
    cb = 1.0 - cum
    x = draw()
    for s, r in list(zip([0] + ns, ns))[::-1]:
        skip_beta = 1.0 - alphas[s + 1: r + 1].prod()
        lamb2 = eta**2 * skip_beta * cb[s] / cb[r]
        eps_pred = toy_eps(x, torch.full((len(gens),), r))
        x0_pred = (cum[r] ** -0.5 * x - (1.0 / cum[r] - 1.0) ** 0.5 * eps_pred).clamp(-1.0, 1.0)
        x_mean = cum[s] ** 0.5 * x0_pred + (cb[s] - lamb2) ** 0.5 * eps_pred
        if s != 0:
            cov = np.clip(cb[r] / cum[r] * (1.0 - ms_eps[r]), 0.0, 1.0)
            sigma2 = lamb2 + (cum[s] ** 0.5 - ((cb[s] - lamb2) * cum[r] / cb[r]) ** 0.5) ** 2 * cov
            x = x_mean + sigma2**0.5 * draw()
        else:
            x = x_mean
    return x


@pytest.mark.parametrize("method", ["analytic-ddim", "ddim"])
def test_official_chains_match_draw_for_draw(method):
    sched = make_schedule("linear", N)
    abar, bbar = sched.alphas_cumprod, sched.bar_betas
    ms_eps = np.concatenate([[0.0], bbar[1:] / (0.3 * abar[1:] + bbar[1:])])
    ms_eps[120:160] = 1.01  # Γ > 1 there: σ² = 0 at those steps, > 0 elsewhere (analytic-ddim)
    ns = even_trajectory(N, 20, "official")
    steps = step_variances(sched, ns, method, gamma=ms_eps, fit="clip")
    assert (steps.sigma2 == 0).any() and (method == "ddim" or (steps.sigma2 > 0).any())
    official_gamma = ms_eps if method == "analytic-ddim" else np.ones(N + 1)  # ddim: no covariance term
    want = official_ddim_chain(sched.betas, official_gamma, ns.tolist(), make_generators(SEEDS))
    chains = {z: run_reverse(toy_eps, sched, steps, make_generators(SEEDS), SHAPE, dtype=torch.float64,
                             direction="network", zero_noise=z) for z in ("draw", "skip")}
    np.testing.assert_allclose(chains["draw"].numpy(), want.numpy(), rtol=0, atol=1e-12)
    if method == "analytic-ddim":  # skipping the zero-variance draws shifts every later noise
        assert torch.max(torch.abs(chains["skip"] - want)) > 1e-3


def test_official_mode_draws_where_sigma2_is_zero():
    base = ["--checkpoint", "c", "--out", "o", "--num-samples", "1", "--steps", "10", "--method", "ddim"]
    parse = build_parser().parse_args
    assert conventions_from(parse(base)).zero_noise == "skip"
    assert conventions_from(parse([*base, "--official"])).zero_noise == "draw"
