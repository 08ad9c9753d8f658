"""The full distributed Γ job with the exact ε* of a mixture (issue 5, first proof), and the
model-error moments with an imperfect one (issue 15).

The mixture's samples are written as real 8-bit shards (2×2 "images"), the
oracle ε-network is saved as a checkpoint, and 2 gloo processes run the job.
The truth is Γ_t of the oracle on exactly the data in the shards, computed by
quadrature in tests/oracle_truth.py (no adpm_dist code), at every t of N=1000; and
A_t, B_t, C_t, the decoder term of ε̂ = k·ε* + o the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.gamma import read_gamma
from adpm_dist.models.io import save_model
from adpm_dist.models.oracle import two_cluster_mixture
from tests import oracle_truth as truth
from tests.estimate_helpers import ROOT, torchrun

pytestmark = pytest.mark.timeout(600)


@pytest.mark.slow
def test_distributed_job_with_exact_eps_matches_exact_gamma(tmp_path):
    d, count = 4, 320
    args = _mixture_shards(tmp_path, count=count, num_timesteps=1000, seed=2)
    out = tmp_path / "gamma.json"
    args[args.index("--num-workers") + 1] = "1"
    res = torchrun(2, [*args, "--out", str(out), "--batch-size", "512"])
    assert res.returncode == 0, res.stderr[-3000:]
    gf = read_gamma(str(out))
    assert gf.count.min() == gf.count.max() == count // 2
    data = shard_data(tmp_path, d)
    assert data.shape == (count // 2, d)
    abar = truth.abar_from_betas(make_schedule("linear", 1000).betas[1:])
    exact = np.array([truth.exact_gamma_on_data(data, abar[t], 0.5, 0.15, 0.3) for t in range(1, 1001)])
    z = (gf.gamma - exact) / gf.stderr
    assert np.all(np.abs(z) < 4), f"t={np.argmax(np.abs(z)) + 1}: z={np.abs(z).max():.2f}"
    assert abs(z.mean()) < 0.25 and 0.5 < z.std() < 1.5

    # The model-error moments of the same run. For ε* = E[ε|x_t], C_t = E‖ε − ε*‖²/d = 1 − Γ_t and
    # (unclipped) A_t = (β̄_t/ᾱ_t) C_t = (β̄_t/ᾱ_t)(1 − Γ_t) (the theorem behind Analytic-DPM), up to
    # the estimates' errors: per pair c + g − 1 has sd ≤ sd(c) + sd(g).
    raw = json.loads(out.read_text())["moments"]
    c, c_se = np.array(raw["c"]["mean"]), np.array(raw["c"]["stderr"])
    r2 = (1.0 - abar[1:]) / abar[1:]
    gap = c - (1.0 - gf.gamma)
    worst = int(np.argmax(np.abs(gap) / (c_se + gf.stderr))) + 1
    assert np.all(np.abs(gap) < 4 * (c_se + gf.stderr)), f"t={worst}"
    a_raw = np.array(raw["a_raw"]["mean"])
    np.testing.assert_allclose(a_raw, r2 * c, rtol=1e-6)  # x₀ − x̂₀ = √(β̄/ᾱ)(ε̂ − ε), pair by pair
    assert np.all(np.abs(a_raw - r2 * (1.0 - gf.gamma)) < 4 * r2 * (c_se + gf.stderr))
    # E‖x₀‖²/d: every sample once at every t, so exactly the data's mean square (float32 pixels).
    moments = gf.error_moments()
    assert moments.x0_sq == pytest.approx(float(np.mean(data**2)), rel=1e-6)
    # The decoder term at t = 1 against SciPy's normal cdf at the bin edges, on exactly this data.
    dec_var = (1 - abar[1]) * (1 - abar[2] / abar[1]) / (1 - abar[2])
    want = truth.exact_error_moments(data, abar[1], 0.5, 0.15, 0.3, dec_var=dec_var)
    for clip, key in ((True, "decoder_nll"), (False, "decoder_nll_raw")):
        m = gf.error_moments(clip_x0=clip)
        assert abs(m.decoder_nll - want[key]) < 4 * m.decoder_nll_stderr, (key, m.decoder_nll, want[key])


def shard_data(tmp_path, d: int) -> np.ndarray:
    """The test split exactly as the job saw it: 8-bit values decoded to [−1, 1], read back
    independently of adpm_dist's data code."""
    import glob
    import io

    import webdataset as wds
    from PIL import Image

    data = []
    for shard in sorted(glob.glob(str(tmp_path / "shards" / "test-*.tar"))):
        for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False):
            img = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=np.float64)
            data.append(img.reshape(-1)[:d] / 127.5 - 1.0)
    return np.stack(data)


def _mixture_shards(tmp_path, d=4, count=320, std=0.15, num_timesteps=200, seed=3, separation=0.5,
                    eps_scale=1.0, eps_offset=0.0, data_std=0.15):
    """Mixture samples (cluster std ``data_std``) as 8-bit 2×2 shards (half test), and an oracle with
    cluster std ``std`` (``eps_scale``/``eps_offset``: an imperfect one, ε̂ = eps_scale·ε* + eps_offset)."""
    spec = {"name": "linear", "num_timesteps": num_timesteps}
    oracle = two_cluster_mixture(d, spec, std=std, separation=separation, eps_scale=eps_scale,
                                 eps_offset=eps_offset)
    oracle.config["shape"] = [1, 2, 2]
    oracle.shape = (1, 2, 2)
    data_model = two_cluster_mixture(d, spec, separation=separation, std=data_std)
    x = data_model.sample_data(count, torch.Generator().manual_seed(seed))
    x = x.reshape(count, d).numpy()
    pixels = np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "mix.npz", images=pixels.reshape(count, 2, 2))
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), f"npz:{tmp_path / 'mix.npz'}",
                    str(tmp_path / "shards"), "--shard-size", "64", "--test-fraction", "0.5"],
                   check=True, capture_output=True)
    save_model(oracle, tmp_path / "oracle.safetensors")
    return ["--checkpoint", str(tmp_path / "oracle.safetensors"), "--data",
            str(tmp_path / "shards" / "test-*.tar"), "--num-workers", "0", "--no-progress"]


@pytest.mark.slow
def test_target_stderr_stops_early_once_every_gamma_is_known_well_enough(tmp_path):
    from adpm_dist.stages import estimate

    args = _mixture_shards(tmp_path)
    out = tmp_path / "g.json"
    assert estimate.main([*args, "--out", str(out), "--samples-per-t", "6000", "--target-stderr", "0.03",
                          "--data-batch", "16", "--flush-every", "4"]) == 0
    gf = read_gamma(str(out))
    assert gf.count.max() < 6000  # stopped early …
    assert np.all(gf.stderr <= 0.03)  # … because every t met the target
    assert gf.count.min() == gf.count.max()  # whole rounds: every t saw the same samples


def test_model_error_is_reported_with_its_t_range(tmp_path, capsys):
    from adpm_dist.stages import estimate

    # The network believes the clusters are 10× tighter than the data: ε is overestimated.
    args = _mixture_shards(tmp_path, std=0.015)
    out = tmp_path / "g.json"
    assert estimate.main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    gf = read_gamma(str(out))
    above = [w for w in gf.extra["model_error"] if w["issue"] == "Γ_t above 1"]
    lo, hi = above[0]["t"]
    assert err.count("warning: Γ_t above 1 by more than 3 standard errors at t = ") == 1
    assert (f"{lo}..{hi}" if lo != hi else f"= {lo}") in err
    assert np.all(gf.gamma[lo - 1:hi] - 1 > 3 * gf.stderr[lo - 1:hi])


@pytest.mark.slow
def test_moments_of_an_imperfect_model_match_their_exact_values(tmp_path):
    """ε̂ = 0.8·ε* + 0.1 on data whose clusters at ±0.9 (std 0.3) reach the edges of [−1, 1] (8-bit
    pixels 0 and 255): the clamp binds at small t (x̂₀ just beyond an edge; a few per cent of A_t,
    ~3 standard errors — the exact per-pair check is tests/test_moments_pairs.py) and at large t
    (x̂₀ far off). Each sample is evaluated 20 times with fresh noise; the truth is the exact
    expectation over the noise on exactly the data in the shards (tests/oracle_truth.py)."""
    from adpm_dist.stages import estimate

    d, sep, std, k, o = 4, 0.9, 0.3, 0.8, 0.1
    args = _mixture_shards(tmp_path, num_timesteps=1000, separation=sep, std=std, data_std=std, eps_scale=k,
                           eps_offset=o, seed=5)
    out = tmp_path / "g.json"
    ts = [1, 2, 5, 20, 100, 300, 600, 1000]
    assert estimate.main([*args, "--out", str(out), "--timesteps", ",".join(map(str, ts)),
                          "--samples-per-t", "3200", "--batch-size", "1024", "--data-batch", "160"]) == 0
    data = shard_data(tmp_path, d)
    assert data.shape == (160, d) and np.mean(np.abs(data) == 1.0) > 0.05  # pixels at the edges
    moments = json.loads(out.read_text())["moments"]
    abar = truth.abar_from_betas(make_schedule("linear", 1000).betas[1:])
    dec_var = (1 - abar[1]) * (1 - abar[2] / abar[1]) / (1 - abar[2])
    want_1 = {}
    for t in ts:
        want = truth.exact_error_moments(data, abar[t], sep, std, 0.3, k, o, dec_var if t == 1 else None)
        want_1 = want if t == 1 else want_1
        for key in ("a", "a_raw", "b", "b_raw", "c"):
            got, se = moments[key]["mean"][t - 1], moments[key]["stderr"][t - 1]
            assert abs(got - want[key]) < 4 * se, (t, key, got, want[key], se)
        assert want["a"] < want["a_raw"]  # the clamp binds at every t here …
        if t >= 600:  # … and matters far beyond the errors at large t: a swap would be caught there
            for key in ("a", "b"):
                assert abs(want[key] - want[key + "_raw"]) > 10 * moments[key]["stderr"][t - 1]
    for key in ("decoder_nll", "decoder_nll_raw"):
        got, se = moments[key]["mean"], moments[key]["stderr"]
        assert abs(got - want_1[key]) < 4 * se, (key, got, want_1[key], se)
    gf = read_gamma(str(out), require_complete=False)
    assert gf.error_moments().x0_sq == pytest.approx(float(np.mean(data**2)), rel=1e-6)  # 20 passes: exact
