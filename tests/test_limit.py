"""Issue 23 item 3: the model's likelihood limit from one Γ pass (adpm_dist/diffusion/limit.py).

Truth, independent of the code under test: the closed form for Gaussian data, the I-MMSE
identity (mutual information by 1-D quadrature, tests/oracle_truth.py's posterior covariance)
for the exact ε* of a two-cluster mixture, and a measured K = N negative ELBO of an imperfect
oracle (``likelihood.negative_elbos`` over fresh images) for the value plan predicts from a Γ file.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from adpm_dist.diffusion.likelihood import negative_elbos
from adpm_dist.diffusion.limit import continuous_limit, diffusion_integral, log_snr, n_step_limit
from adpm_dist.diffusion.residual import ErrorMoments, prior_kl
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.gamma import GammaFile, load_for, pair_errors
from adpm_dist.models.oracle import two_cluster_mixture
from adpm_dist.stages import plan
from tests.oracle_truth import exact_posterior_cov

LN2 = math.log(2.0)


def moments_from(a: np.ndarray, x0_sq: float, decoder: float = 0.0) -> ErrorMoments:
    nan = np.full(a.shape, np.nan)
    return ErrorMoments(a=a, b=nan, c=nan, x0_sq=x0_sq, decoder_nll=decoder)


def test_on_gaussian_data_the_n_step_limit_is_the_continuous_one_in_closed_form():
    """x₀ ~ N(0, s²I), exact ε*: A_t = s²/(1 + SNR_t s²); every reverse step is exactly Gaussian, so
    Σ ½ log(1 + ΔSNR·A_t) = ½ log((1 + SNR_1 s²)/(1 + SNR_N s²)) = ½ ∫ A dSNR exactly."""
    sched, s2 = make_schedule("linear", 1000), 0.2
    snr = np.exp(log_snr(sched))
    a = np.concatenate([[np.nan], s2 / (1 + snr[1:] * s2)])
    m = moments_from(a, s2, decoder=0.7)
    truth = 0.5 * math.log((1 + snr[1] * s2) / (1 + snr[-1] * s2))
    bits, _ = n_step_limit(sched, m)
    assert bits * LN2 - prior_kl(sched, s2) - 0.7 == pytest.approx(truth, rel=1e-12)
    cont = continuous_limit(sched, m)
    assert cont["diffusion_bpd"] * LN2 == pytest.approx(truth, rel=1e-4)  # the trapezoid rule in log SNR
    assert cont["prior_bpd"] * LN2 == pytest.approx(prior_kl(sched, s2), rel=1e-14)


def _axis_mutual_information(abar: float, m: float, s: float, w0: float) -> float:
    """I(x; √ᾱ x + √β̄ ε) for x ~ w0 N(−m, s²) + (1−w0) N(m, s²), by quadrature of the entropy."""
    v, bbar = abar * s * s + 1 - abar, 1 - abar

    def p(z):
        return sum(w * math.exp(-0.5 * (z - mu) ** 2 / v) / math.sqrt(2 * math.pi * v)
                   for w, mu in ((w0, -m * math.sqrt(abar)), (1 - w0, m * math.sqrt(abar))))

    span = m * math.sqrt(abar) + 14 * math.sqrt(v)
    h, _ = integrate.quad(lambda z: -p(z) * math.log(max(p(z), 1e-300)), -span, span, limit=400,
                          points=[-m * math.sqrt(abar), m * math.sqrt(abar)], epsabs=1e-13)
    return h - 0.5 * math.log(2 * math.pi * math.e * bbar)


def test_exact_mixture_model_integral_is_the_mutual_information():
    """I-MMSE: ½ ∫ SNR·mmse dλ = [I(x₀; x_1) − I(x₀; x_N)]/d; and the N-step chain can only lose."""
    sched, d, m, s, w0 = make_schedule("linear", 1000), 8, 0.5, 0.15, 0.3
    abar = sched.alphas_cumprod
    a = np.concatenate([[np.nan], [exact_posterior_cov(abar[t], d, m, s, w0) for t in range(1, 1001)]])

    def info(t):  # per dimension: one mixture axis, d − 1 Gaussian N(0, s²) axes
        snr = abar[t] / (1 - abar[t])
        return (_axis_mutual_information(abar[t], m, s, w0) + (d - 1) * 0.5 * math.log(1 + snr * s * s)) / d

    value, _ = diffusion_integral(sched, a)
    assert value == pytest.approx(info(1) - info(1000), rel=5e-4)
    x0_sq = (s * s * d + m * m) / d
    n_step = n_step_limit(sched, moments_from(a, x0_sq))[0]
    assert n_step >= continuous_limit(sched, moments_from(a, x0_sq))["bpd"] - 1e-4


N, D = 60, 4


@pytest.fixture(scope="module")
def oracle_and_gamma(tmp_path_factory):
    """An imperfect oracle (ε̂ = 0.9·ε* + 0.05) and its Γ file from one pass over 300 images."""
    spec = {"name": "linear", "num_timesteps": N}
    model = two_cluster_mixture(D, spec, eps_scale=0.9, eps_offset=0.05)
    sched = model.schedule
    gen = torch.Generator().manual_seed(0)
    x0 = model.sample_data(300, gen).clamp(-1, 1)
    gf = GammaFile.empty(sched, {"digest": "oracle", "name": "mixture"}, moments=True, halves=True)
    t = torch.arange(1, N + 1).repeat(x0.shape[0])
    xs = x0.repeat_interleave(N, dim=0)
    noise = torch.randn(xs.shape, generator=gen, dtype=torch.float64)
    root_abar, root_bbar = (torch.as_tensor(v[t.numpy()] ** 0.5)[:, None] for v in (sched.alphas_cumprod,
                                                                                     sched.bar_betas))
    x_t = root_abar * xs + root_bbar * noise
    with torch.no_grad():
        eps = model(x_t, t)
    half = (torch.arange(x0.shape[0]) % 2).repeat_interleave(N).numpy()
    gf.add(t.numpy(), (eps**2).mean(dim=1).numpy(), pair_errors(sched, xs, t, noise, eps), half=half)
    gf.contributions.append({"run_id": "oracle", "rank": 0, "world_size": 1, "samples": [0, 300]})
    path = tmp_path_factory.mktemp("limit") / "gamma.json"
    path.write_text(gf.to_json())
    return model, str(path)


def test_limit_from_one_gamma_pass_matches_a_measured_k_equals_n_nelbo(oracle_and_gamma, capsys):
    model, path = oracle_and_gamma
    assert plan.main(["--gamma", path, "--steps", "5", "--method", "residual-ddpm", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    lim = got["limit"]
    assert got["gap_to_limit_bpd"] > 0 and got["gap_to_limit_crossfit_bpd"] > 0  # K = 5 is above the limit
    # Measured: the N-step chain with residual-ddpm's σ² from the same file, on 400 fresh images.
    ref = load_for(None, path)
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(400)]
    x0 = model.sample_data(400, torch.Generator().manual_seed(7)).clamp(-1, 1)
    out = negative_elbos(lambda x, t: model(x, t), model.schedule, np.arange(1, N + 1), ["residual-ddpm"], x0,
                         gens, moments=ref.moments(False))["residual-ddpm"]["bpd"].numpy()
    measured, measured_se = out.mean(), out.std(ddof=1) / math.sqrt(out.size)
    for key in ("n_step", "n_step_crossfit"):
        se = math.hypot(lim[f"{key}_stderr"], measured_se)
        assert abs(lim[f"{key}_bpd"] - measured) < 3 * se, (key, lim[f"{key}_bpd"], measured, se)
    cont = lim["continuous"]
    assert cont["bpd"] == pytest.approx(cont["prior_bpd"] + cont["diffusion_bpd"] + cont["decoder_bpd"])
