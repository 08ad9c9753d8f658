"""``--decoder official``: ``evaluate nll --official`` equals the official ``nelbo_ms_eps_ddpm``
(issue 23 item 1).

Independent truth: the official code's NELBO (baofff/Analytic-DPM,
cifar_imagenet_codes/core/inference/ll/elbo.py ``nelbo_ms_eps_ddpm``, with
core/func/functions.py ``log_discretized_normal`` and ``kl_between_normal``) re-written below
from its definition in float64 torch, fed the same noise in the same order (step t = N first,
t = 1 last) from freshly seeded generators.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from adpm_dist.diffusion.likelihood import negative_elbos
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.diffusion.trajectory import even_trajectory
from adpm_dist.stages.conventions import conventions_from
from adpm_dist.stages.evaluate_args import build_parser

N, SEEDS = 200, (11, 12, 13)


def toy_eps(x, n):
    """A smooth, deliberately imperfect ε-model (x̂₀ leaves [−1, 1] at large t, so the clamp acts)."""
    scale = (n.to(torch.float64) / N).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(0.7 * x + scale) * (0.5 + 0.5 * scale)


def official_nelbo(x0, betas0, ms_eps, ns, gens):
    def kl(mu_q, var_q, mu_p, var_p):
        return (0.5 * (var_q / var_p + (mu_q - mu_p) ** 2 / var_p + math.log(var_p) - math.log(var_q) - 1.0)
                ).flatten(1).sum(1)

    def approx_cdf(z):
        return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * torch.pow(z, 3))))

    def log_disc(x, mu, var):
        left, right = (x - mu - 1.0 / 255) / var**0.5, (x - mu + 1.0 / 255) / var**0.5
        cl, cr = approx_cdf(left), approx_cdf(right)
        return torch.where(x < -0.999, cr.clamp(min=1e-12).log(),
                           torch.where(x > 0.999, (1.0 - cl).clamp(min=1e-12).log(),
                                       (cr - cl).clamp(min=1e-12).log()))

    n_all = len(betas0) - 1
    alphas = 1.0 - betas0
    cum = alphas.cumprod()
    cb = 1.0 - cum
    nelbo = kl(cum[n_all] ** 0.5 * x0, cb[n_all], torch.zeros_like(x0), 1.0)
    for s, r in list(zip([0] + ns, ns))[::-1]:
        skip_alpha = alphas[s + 1: r + 1].prod()
        skip_beta = 1.0 - skip_alpha
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=torch.float64) for g in gens])
        x_r = cum[r] ** 0.5 * x0 + cb[r] ** 0.5 * eps
        coeff1 = skip_beta * cum[s] ** 0.5 / (1.0 - cum[r])
        coeff2 = skip_alpha**0.5 * (1.0 - cum[s]) / (1.0 - cum[r])
        eps_pred = toy_eps(x_r, torch.full((x0.shape[0],), r))
        x0_pred = (cum[r] ** -0.5 * x_r - (1.0 / cum[r] - 1.0) ** 0.5 * eps_pred).clamp(-1.0, 1.0)
        mu_p = coeff1 * x0_pred + coeff2 * x_r
        if s != 0:
            small = skip_beta * (1.0 - cum[s]) / (1.0 - cum[r])
            cov = np.clip(cb[r] / cum[r] * (1.0 - ms_eps[r]), 0.0, 1.0)
            var_p = small + cum[s] * skip_beta**2 / cb[r] ** 2 * cov
            nelbo = nelbo + kl(coeff1 * x0 + coeff2 * x_r, small, mu_p, var_p)
        else:
            var_p = (1.0 - alphas[2]) * (1.0 - cum[1]) / (1.0 - cum[2])
            nelbo = nelbo - log_disc(x0, mu_p, var_p).flatten(1).sum(1)
    return nelbo / (x0[0].numel() * math.log(2.0))


def gens():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def test_official_decoder_equals_the_official_nelbo():
    sched = make_schedule("linear", N)
    pixels = torch.randint(0, 256, (len(SEEDS), 3, 4, 4), generator=torch.Generator().manual_seed(0))
    pixels[0, 0, 0] = torch.tensor([0, 255, 0, 255])  # both open edge bins
    x0 = pixels.to(torch.float64) / 127.5 - 1.0
    abar, bbar = sched.alphas_cumprod, sched.bar_betas
    ms_eps = np.concatenate([[0.0], bbar[1:] / (0.2 * abar[1:] + bbar[1:])])
    ms_eps[N - 10:] += 1e-3  # Γ > 1 near N: the clip to [0, 1] acts
    for k in (10, 37):
        ns = even_trajectory(N, k, "official")
        want = official_nelbo(x0, sched.betas, ms_eps, ns.tolist(), gens())
        got = {d: negative_elbos(toy_eps, sched, ns, ["analytic-ddpm"], x0, gens(), gamma=ms_eps,
                                 clip_x0=True, fit="clip", decoder=d)["analytic-ddpm"]["bpd"]
               for d in ("official", "exact")}
        np.testing.assert_allclose(got["official"].numpy(), want.numpy(), rtol=0, atol=1e-9)
        assert torch.max(torch.abs(got["exact"] - want)) > 1e-6  # the decoders do differ


def test_official_mode_selects_the_official_decoder():
    base = ["nll", "--checkpoint", "c", "--data", "d", "--steps", "10", "--out", "o"]
    parse = build_parser().parse_args
    assert conventions_from(parse(base)).decoder == "exact"
    assert conventions_from(parse([*base, "--official"])).decoder == "official"
    assert conventions_from(parse([*base, "--official", "--decoder", "exact"])).decoder == "exact"
    assert conventions_from(parse([*base, "--decoder", "official"])).decoder == "official"
