"""Issue 23 item 2: plan's cross-fitted NELBO prediction is honest where the in-sample one is biased low.

Gaussian data x₀ ~ N(0, s² I) and the imperfect linear model ε̂ = k·ε*(x_t) (ε* = √β̄ x_t/v,
v = ᾱs² + β̄) give every per-pair statistic in closed form from (x₀, ε), and the exact moments
A_t = (β̄/ᾱ)[(1 − kβ̄/v)² + k²ᾱβ̄s²/v²] as truth. Many small Γ files (few images each) are
planned with the expected-NELBO DP; the true NELBO of each chosen plan is the exact moments'
score of its τ and σ² (the score is linear in the moments, so that is its expectation).
"""

from __future__ import annotations

import json
import math

import numpy as np

from adpm_dist.diffusion.conventions import OURS
from adpm_dist.diffusion.residual import ErrorMoments, predicted_nelbo
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.gamma import FORMAT_3, GammaFile, load_for, loads, merge
from adpm_dist.stages import plan
from adpm_dist.stages.plan_predict import choose, half_refs

S2, K_SCALE, D, N = 0.25, 0.8, 4, 40
SCHED = make_schedule("linear", N)
DECODER = 1.0  # a constant decoder term: it shifts every prediction alike


def _coefficients():
    abar, bbar = SCHED.alphas_cumprod[1:], SCHED.bar_betas[1:]
    v = abar * S2 + bbar
    return abar, bbar, v


def exact_moments() -> ErrorMoments:
    abar, bbar, v = _coefficients()
    c = (1 - K_SCALE * bbar / v) ** 2 + K_SCALE**2 * abar * bbar * S2 / v**2
    a = np.concatenate([[np.nan], bbar / abar * c])
    unused = np.full(N + 1, np.nan)
    return ErrorMoments(a=a, b=unused, c=unused, x0_sq=S2, decoder_nll=DECODER)


def gaussian_gamma_file(seed: int, images: int, start: int = 0) -> GammaFile:
    """The Γ job's sums for ``images`` images (sample ids start..), every t, drawn exactly."""
    rng = np.random.default_rng(seed)
    abar, bbar, v = _coefficients()
    gf = GammaFile.empty(SCHED, {"digest": "gauss", "name": "linear-model"}, moments=True, halves=True)
    t = np.arange(1, N + 1)
    for i in range(start, start + images):
        x0 = rng.normal(0.0, math.sqrt(S2), D)
        eps = rng.normal(size=(N, D))
        xt = np.sqrt(abar)[:, None] * x0 + np.sqrt(bbar)[:, None] * eps
        eps_hat = K_SCALE * np.sqrt(bbar)[:, None] * xt / v[:, None]
        c = ((eps - eps_hat) ** 2).mean(axis=1)
        a = bbar / abar * c
        b = -np.sqrt(bbar / abar) * c
        dec = np.where(t == 1, DECODER, np.nan)
        errors = {"a": a, "a_raw": a, "b": b, "b_raw": b, "c": c, "x0_sq": np.full(N, (x0**2).mean()),
                  "decoder_nll": dec, "decoder_nll_raw": dec}
        gf.add(t, (eps_hat**2).mean(axis=1), errors, half=np.full(N, i % 2))
    gf.contributions.append({"run_id": f"s{seed}", "rank": 0, "world_size": 1,
                             "samples": [start, start + images]})
    return gf


def true_nelbo(var) -> float:
    return predicted_nelbo(SCHED, var.s, var.t, var.lambda2, var.sigma2, exact_moments())[0]


def test_halves_round_trip_merge_and_sum_to_the_total(tmp_path):
    one, two = gaussian_gamma_file(0, 6), gaussian_gamma_file(1, 5, start=6)
    back = loads(one.to_json(), "g.json")
    assert json.loads(one.to_json())["format"] == FORMAT_3 and back.half is not None
    a, b = back.halves()
    np.testing.assert_array_equal(a.count, [3] * N)  # ids 0, 2, 4
    np.testing.assert_allclose(a.sum + b.sum, one.sum, rtol=1e-14)
    np.testing.assert_allclose(a.moments.per_t + b.moments.per_t, one.moments.per_t, rtol=1e-12, atol=1e-15)
    m = merge([one, two])
    np.testing.assert_array_equal(m.halves()[0].count, [3 + 3] * N)  # ids 6, 8, 10 join half A
    no_halves = loads(two.to_json(), "h.json")
    no_halves.half = None
    assert merge([one, no_halves]).half is None


def test_crossfitted_prediction_is_unbiased_where_the_in_sample_one_is_biased_low(tmp_path):
    args = dict(steps=5, method="residual-ddpm", trajectory="optimal", eta=0.0, clip_pixel=None, conv=OURS)
    rows = []
    for seed in range(40):
        path = tmp_path / f"g{seed}.json"
        path.write_text(gaussian_gamma_file(seed, 8).to_json())
        got = plan.make_plan(str(path), args["steps"], args["method"], args["trajectory"])
        ref = load_for(None, str(path))
        truth_full = true_nelbo(choose(ref, **args)[1])
        truth_halves = np.mean([true_nelbo(choose(h, **args)[1]) for h in half_refs(ref)])
        rows.append((got["predicted_nelbo_bpd"], got["predicted_nelbo_crossfit_bpd"],
                     got["predicted_nelbo_crossfit_stderr"], truth_full, truth_halves))
    in_sample, cf, cf_se, truth_full, truth_halves = np.array(rows).T
    spread = lambda x: x.std(ddof=1) / math.sqrt(x.size)  # noqa: E731
    bias_in, bias_cf = in_sample - truth_full, cf - truth_halves
    assert bias_in.mean() < -4 * spread(bias_in)  # the in-sample prediction is biased low …
    assert abs(bias_cf.mean()) < 3 * spread(bias_cf)  # … the cross-fitted one is unbiased for its target
    assert (cf - truth_full).mean() > -2 * spread(cf - truth_full)  # and not optimistic for the plan used
    assert np.mean(np.abs(cf - truth_halves) <= 2 * cf_se) >= 0.8  # its s.e. covers the error
