"""The GPU tier (issue 16, item 3): the real CUDA paths, one short run each; the numeric
assertions of issue 22 are in tests/test_gpu_numeric.py.

Marked ``gpu``: ``make test-gpu`` runs just these. Where torch sees no CUDA device every test
skips with that reason, so ``make test`` stays green on CPU machines. tools/gpu_check.sh runs
this tier first on a one-GPU machine. None of these has run on a GPU yet (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adpm_dist.gamma import read_gamma
from adpm_dist.models.loading import numeric_mode
from tests.estimate_helpers import tiny_job_inputs

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False); "
                              "run on a GPU machine: make test-gpu or tools/gpu_check.sh"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_inputs(tmp_path_factory.mktemp("gpu"))


def gamma_job(setup, out, precision: str) -> np.ndarray:
    from adpm_dist.stages import estimate

    assert estimate.main(["--checkpoint", setup["model"], "--data", setup["data"], "--out", str(out),
                          "--num-workers", "0", "--no-progress", "--precision", precision]) == 0
    gf = read_gamma(str(out))
    assert gf.extra["numeric_mode"] == numeric_mode(precision, "cuda")
    return gf.gamma


@pytest.mark.parametrize("zero", [0, 3])
def test_deepspeed_training_with_ema_and_sample_grids_on_cuda(tmp_path, zero):
    """bf16 DeepSpeed on the GPU, EMA beside the module, grids at sample_every > 0."""
    from adpm_dist.io import dist
    from adpm_dist.train import loop as train
    from adpm_dist.train.config import build_config, preset_path
    from adpm_dist.train.engine import forget_deepspeed_groups, module_device, prepare_deepspeed

    sys.path.insert(0, str(ROOT / "tools"))
    import make_shards

    make_shards.main(["digits", str(tmp_path / "shards"), "--shard-size", "400"])
    cfg = build_config(str(preset_path("tiny")), [
        f"data.urls=[{tmp_path / 'shards'}/train-*.tar]", f"train.run_dir={tmp_path / 'run'}",
        "train.total_steps=6", "train.ckpt_every=3", "data.batch_size=16", f"train.zero_stage={zero}",
        "train.sample_every=3", "train.sample_steps=5", "train.sample_count=4", "train.log_every=1"])
    prepare_deepspeed()
    info = dist.init_group()
    try:
        trainer = train.Trainer(cfg, info)
        assert module_device(trainer.engine).type == "cuda"
        assert trainer.ema.device == module_device(trainer.engine)
        assert trainer.fit() == 0
        assert trainer.ema.device.type == "cuda"
    finally:
        dist.shutdown()
        forget_deepspeed_groups()
    for step in (3, 6):
        assert (tmp_path / "run" / "samples" / f"step_{step:08d}.png").stat().st_size > 0
    assert (tmp_path / "run" / "latest.json").exists()


def test_gamma_job_fp32_agrees_with_fp64_and_bf16_is_reported(setup, tmp_path, record_property):
    g64 = gamma_job(setup, tmp_path / "g64.json", "fp64")
    g32 = gamma_job(setup, tmp_path / "g32.json", "fp32")
    gbf = gamma_job(setup, tmp_path / "gbf.json", "bf16")
    fp32_err = float(np.nanmax(np.abs(g32 - g64)))
    bf16_err = float(np.nanmax(np.abs(gbf - g64)))
    record_property("gamma_max_abs_diff_fp32_vs_fp64", fp32_err)
    record_property("gamma_max_abs_diff_bf16_vs_fp64", bf16_err)  # reported, not asserted
    print(f"Γ max |Δ| vs fp64: fp32 {fp32_err:.3g}, bf16 {bf16_err:.3g}")
    assert fp32_err < 1e-5


def test_sampling_on_cuda_is_invariant_to_batch_size(setup, tmp_path):
    """CUDA generators per image: the same bytes for any batch size on the same device type."""
    from adpm_dist.stages import sample
    from tests.test_sample import shard_bytes

    for name, batch in (("a", "5"), ("b", "3")):
        assert sample.main(["--checkpoint", setup["model"], "--method", "ddpm-beta", "--steps", "6",
                            "--num-samples", "14", "--shard-size", "7", "--out", str(tmp_path / name),
                            "--no-progress", "--batch-size", batch, "--precision", "fp64"]) == 0
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_nll_on_cuda_in_fp32(setup, tmp_path):
    from adpm_dist.stages import evaluate

    gamma = tmp_path / "g.json"
    gamma_job(setup, gamma, "fp32")
    assert evaluate.main(["nll", "--checkpoint", setup["model"], "--gamma", str(gamma), "--data",
                          setup["data"], "--steps", "5,10", "--methods", "ddpm-tilde,analytic-ddpm",
                          "--trajectory", "even", "--out", str(tmp_path / "nll"), "--num-workers", "0",
                          "--no-progress"]) == 0
    doc = json.loads((tmp_path / "nll" / "nll.json").read_text())
    assert doc["numeric_mode"] == numeric_mode("fp32", "cuda")
    assert all(np.isfinite(r["bpd"]) for r in doc["results"].values())


def test_fid_features_on_cuda_match_cpu(record_property):
    """fp32 with TF32 off (the default now): CUDA features equal CPU's to fp32 conv rounding;
    TF32 and bf16 are reported (how far each moves the features), not asserted."""
    from adpm_dist.models.fid import InceptionFeatures

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cpu = InceptionFeatures("cpu")(x)
    gpu = InceptionFeatures("cuda")(x)
    scale = float(np.abs(cpu).max())
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-3 * scale)
    for mode in ("tf32", "bf16"):
        got = InceptionFeatures("cuda", precision=mode)(x)
        record_property(f"fid_features_{mode}_max_rel_diff", float(np.abs(got - cpu).max()) / scale)
