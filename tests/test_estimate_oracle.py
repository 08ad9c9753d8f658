"""The full distributed Γ job with the exact ε* of a mixture (issue 5, first proof).

The mixture's samples are written as real 8-bit shards (2×2 "images"), the
oracle ε-network is saved as a checkpoint, and 2 gloo processes run the job.
The truth is Γ_t of the oracle on exactly the data in the shards, computed by
quadrature in tests/oracle_truth.py (no adpm_dist code), at every t of N=1000.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from adpm_dist.gamma import read_gamma
from adpm_dist.models.io import save_model
from adpm_dist.models.oracle import two_cluster_mixture
from tests import oracle_truth as truth
from tests.estimate_helpers import ROOT, torchrun

pytestmark = pytest.mark.timeout(600)


def test_distributed_job_with_exact_eps_matches_exact_gamma(tmp_path):
    d, count = 4, 320
    args = _mixture_shards(tmp_path, count=count, num_timesteps=1000, seed=2)
    out = tmp_path / "gamma.json"
    args[args.index("--num-workers") + 1] = "1"
    res = torchrun(2, [*args, "--out", str(out), "--batch-size", "512"])
    assert res.returncode == 0, res.stderr[-3000:]
    gf = read_gamma(str(out))
    assert gf.count.min() == gf.count.max() == count // 2

    # The data exactly as the job saw it: 8-bit values decoded to [−1, 1].
    import glob
    import io

    import webdataset as wds  # read back independently of adpm_dist.data
    from PIL import Image

    data = []
    for shard in sorted(glob.glob(str(tmp_path / "shards" / "test-*.tar"))):
        for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False):
            img = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=np.float64)
            data.append(img.reshape(-1)[:d] / 127.5 - 1.0)
    data = np.stack(data)
    assert data.shape == (count // 2, d)
    from adpm_dist.diffusion.schedule import make_schedule

    abar = truth.abar_from_betas(make_schedule("linear", 1000).betas[1:])
    exact = np.array([truth.exact_gamma_on_data(data, abar[t], 0.5, 0.15, 0.3) for t in range(1, 1001)])
    z = (gf.gamma - exact) / gf.stderr
    assert np.all(np.abs(z) < 4), f"t={np.argmax(np.abs(z)) + 1}: z={np.abs(z).max():.2f}"
    assert abs(z.mean()) < 0.25 and 0.5 < z.std() < 1.5


def _mixture_shards(tmp_path, d=4, count=320, std=0.15, num_timesteps=200, seed=3):
    """Mixture samples as 8-bit 2×2 shards (half test), and an oracle with cluster std ``std``."""
    spec = {"name": "linear", "num_timesteps": num_timesteps}
    oracle = two_cluster_mixture(d, spec, std=std)
    oracle.config["shape"] = [1, 2, 2]
    oracle.shape = (1, 2, 2)
    x = two_cluster_mixture(d, spec).sample_data(count, torch.Generator().manual_seed(seed))
    x = x.reshape(count, d).numpy()
    pixels = np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "mix.npz", images=pixels.reshape(count, 2, 2))
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), f"npz:{tmp_path / 'mix.npz'}",
                    str(tmp_path / "shards"), "--shard-size", "64", "--test-fraction", "0.5"],
                   check=True, capture_output=True)
    save_model(oracle, tmp_path / "oracle.safetensors")
    return ["--checkpoint", str(tmp_path / "oracle.safetensors"), "--data",
            str(tmp_path / "shards" / "test-*.tar"), "--num-workers", "0", "--no-progress"]


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
