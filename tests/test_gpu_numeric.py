"""The GPU tier's numeric assertions (issue 22 item 4): what only a CUDA device can show.

Marked ``gpu`` like tests/test_gpu.py: ``make test-gpu`` and tools/gpu_check.sh run them; where
torch sees no CUDA device every test skips with that reason. None of these has run on a GPU
yet. Tolerances (stated, not tuned on a GPU):

- Γ in fp32 (TF32 off) on CUDA vs the CPU fp64 reference: max |ΔΓ| < 1e-5. Noise stream 2
  draws the same bits on every device, so what is left is fp32 arithmetic (CPU fp32 vs fp64:
  8e-10, tools/bench_modes.py); 1e-5 is ~1 % of Γ's gap to 1 near t = N.
- World size, two processes sharing the GPU (NCCL where it allows two ranks on one device,
  else gloo with the network on the GPU): the Γ job in fp64 equal to one process's to 1e-12
  (float64 sums in another order), sample shards byte-identical (the same batches per image).
- bf16 training: after N steps the trainer's EMA equals an fp32 EMA of DeepSpeed's fp32 master
  weights, updated on the device with the same decay, to fp32 rounding (rtol 1e-6).
- Hot loops without host syncs: after warm-up, the Γ job's per-unit work, the sampler's
  reverse chain and the training step (less its one agreement read, see Trainer.agree) run
  under ``torch.cuda.set_sync_debug_mode("error")``: any synchronizing call raises there, with
  the traceback naming it.
- The failure protocol on the GPU: rank 1 raising in a round ends both ranks within 30 s.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from adpm_dist.gamma import read_gamma
from tests.estimate_helpers import ROOT, free_port, tiny_job_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False); "
                              "run on a GPU machine: make test-gpu or tools/gpu_check.sh"),
]
GAMMA_ARGS = ["--num-workers", "0", "--no-progress", "--timesteps", "1-20", "--data-batch", "4",
              "--batch-size", "16"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_inputs(tmp_path_factory.mktemp("gpu_numeric"))


def run_module(module: str, argv: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 240):
    """``python -m module`` (or 2 ranks of it under torchrun); (exit status, stderr)."""
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m"] if nproc > 1 else [sys.executable, "-m"]
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([*head, module, *argv], env=full, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr


def two_ranks_on_one_gpu(module: str, argv: list[str], record_property) -> None:
    """Two ranks on the one GPU: NCCL first; gloo (network still on the GPU) where NCCL refuses."""
    code, err = run_module(module, argv, nproc=2)
    backend = "nccl"
    if code != 0 and ("Duplicate GPU" in err or "ncclInvalidUsage" in err):
        backend = "gloo"
        code, err = run_module(module, argv, nproc=2, env={"ADPM_DIST_BACKEND": "gloo"})
    record_property(f"{module}_two_ranks_backend", backend)
    assert code == 0, err[-4000:]


def test_gamma_fp32_on_cuda_equals_the_cpu_fp64_reference(setup, tmp_path, record_property):
    from adpm_dist.stages import estimate

    common = ["--checkpoint", setup["model"], "--data", setup["data"], *GAMMA_ARGS]
    code, err = run_module("adpm_dist.estimate", [*common, "--out", str(tmp_path / "cpu.json"),
                                                  "--precision", "fp64"], env={"CUDA_VISIBLE_DEVICES": ""})
    assert code == 0, err[-4000:]
    assert estimate.main([*common, "--out", str(tmp_path / "cuda.json"), "--precision", "fp32"]) == 0
    ref, got = read_gamma(str(tmp_path / "cpu.json")), read_gamma(str(tmp_path / "cuda.json"))
    assert ref.extra["numeric_mode"]["device"] == "cpu" and got.extra["numeric_mode"]["device"] == "cuda"
    assert got.extra["numeric_mode"]["tf32"] is False
    np.testing.assert_array_equal(got.count, ref.count)
    err_max = float(np.nanmax(np.abs(got.gamma - ref.gamma)))
    record_property("gamma_cuda_fp32_vs_cpu_fp64_max_abs", err_max)
    print(f"Γ CUDA fp32 vs CPU fp64: max |Δ| {err_max:.3g}")
    assert err_max < 1e-5


def test_world_size_invariance_with_two_ranks_sharing_the_gpu(setup, tmp_path, record_property):
    from tests.test_sample import shard_bytes

    common = ["--checkpoint", setup["model"], "--data", setup["data"], *GAMMA_ARGS, "--precision", "fp64"]
    code, err = run_module("adpm_dist.estimate", [*common, "--out", str(tmp_path / "g1.json")])
    assert code == 0, err[-4000:]
    two_ranks_on_one_gpu("adpm_dist.estimate", [*common, "--out", str(tmp_path / "g2.json")], record_property)
    one, two = read_gamma(str(tmp_path / "g1.json")), read_gamma(str(tmp_path / "g2.json"))
    np.testing.assert_array_equal(one.count, two.count)
    np.testing.assert_allclose(two.gamma, one.gamma, rtol=1e-12, atol=0)

    argv = ["--checkpoint", setup["model"], "--method", "ddpm-beta", "--steps", "6", "--num-samples", "12",
            "--shard-size", "3", "--batch-size", "3", "--no-progress"]
    code, err = run_module("adpm_dist.sample", [*argv, "--out", str(tmp_path / "s1")])
    assert code == 0, err[-4000:]
    two_ranks_on_one_gpu("adpm_dist.sample", [*argv, "--out", str(tmp_path / "s2")], record_property)
    assert shard_bytes(tmp_path / "s1") == shard_bytes(tmp_path / "s2")


def sync_free_after(monkeypatch, owner, name: str, warmup: int) -> list[int]:
    """Wrap ``owner.name``: its first ``warmup`` calls run as usual, later ones under sync debug
    mode "error" (the mode before is restored after each call, so wrappers nest). Returns the
    call counter."""
    real, calls = getattr(owner, name), [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] <= warmup:
            return real(*a, **k)
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode(before)

    monkeypatch.setattr(owner, name, wrapped)
    return calls


def sync_allowed(monkeypatch, owner, name: str) -> None:
    """``owner.name`` may synchronize (sync debug mode off while it runs)."""
    real = getattr(owner, name)

    def wrapped(*a, **k):
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode(before)

    monkeypatch.setattr(owner, name, wrapped)


def test_gamma_job_hot_loop_has_no_host_sync(setup, tmp_path, monkeypatch):
    """Per data unit: noise, q_sample, the network, the on-device sums; the one device→host copy
    is at the round's end (DeviceSums.sync), outside the wrapped calls."""
    from adpm_dist.stages import estimate

    units = sync_free_after(monkeypatch, estimate, "process_unit", warmup=2)
    sync_free_after(monkeypatch, estimate.PairEvaluator, "flush", warmup=2)
    assert estimate.main(["--checkpoint", setup["model"], "--data", setup["data"], *GAMMA_ARGS,
                          "--flush-every", "100", "--out", str(tmp_path / "g.json")]) == 0
    assert units[0] >= 5  # steady-state units did run under "error"


def test_sampler_hot_loop_has_no_host_sync(setup, tmp_path, monkeypatch):
    """The whole reverse chain of a batch (K network calls, noise, updates); the images leave the
    device once per batch, after it."""
    from adpm_dist.stages import sample

    calls = sync_free_after(monkeypatch, sample, "run_reverse", warmup=1)
    assert sample.main(["--checkpoint", setup["model"], "--method", "ddpm-beta", "--steps", "6",
                        "--num-samples", "12", "--shard-size", "4", "--batch-size", "4", "--no-progress",
                        "--out", str(tmp_path / "s")]) == 0
    assert calls[0] == 3


def train_config(tmp_path, shards, *extra):
    from adpm_dist.train.config import build_config, preset_path

    return build_config(str(preset_path("tiny")), [
        f"data.urls=[{shards}/train-*.tar]", f"train.run_dir={tmp_path / 'run'}", "data.batch_size=16",
        "train.sample_every=0", "train.ckpt_every=1000", "train.log_every=1000", *extra])


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tools"))
    import make_shards

    out = tmp_path_factory.mktemp("gpu_digits") / "shards"
    make_shards.main(["digits", str(out), "--shard-size", "400"])
    return out


def in_process_trainer(cfg):
    from adpm_dist.io import dist
    from adpm_dist.train import loop as train
    from adpm_dist.train.engine import prepare_deepspeed

    prepare_deepspeed()
    return train.Trainer(cfg, dist.init_group())


def end_trainer() -> None:
    from adpm_dist.io import dist
    from adpm_dist.train.engine import forget_deepspeed_groups

    dist.shutdown()
    forget_deepspeed_groups()


def test_training_step_has_no_host_sync_but_its_agreement(tmp_path, digit_shards, monkeypatch):
    from adpm_dist.train import loop as train

    cfg = train_config(tmp_path, digit_shards, "train.total_steps=6", "train.precision=bf16")
    sync_allowed(monkeypatch, train.Trainer, "agree")  # the step's one designed host read
    calls = sync_free_after(monkeypatch, train.Trainer, "step", warmup=2)
    trainer = in_process_trainer(cfg)
    try:
        assert trainer.fit() == 0
    finally:
        end_trainer()
    assert calls[0] == 6


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_bf16_ema_equals_the_fp32_ema_of_the_master_weights(tmp_path, digit_shards, zero):
    """The public behaviour of bf16 training (tests/test_bf16_master.py shows it on CPU): the EMA
    is fed from DeepSpeed's fp32 masters, not from the bf16 module weights."""
    from tests.test_bf16_master import _full_masters

    steps = 5
    cfg = train_config(tmp_path, digit_shards, f"train.total_steps={steps}", "train.precision=bf16",
                       f"train.zero_stage={zero}", "optim.warmup_steps=0")
    trainer = in_process_trainer(cfg)
    try:
        names = [n for n, _ in trainer.engine.module.named_parameters()]
        trainer.ema.sync(list(trainer.engine.module.buffers()))
        start = trainer.ema.state_tensors()
        ref = {n: start[n].to(trainer.device) for n in names}
        decay, warmup, updates = trainer.ema.decay, trainer.ema.warmup, [0]
        real = trainer.step

        def step(*a, **k):
            out = real(*a, **k)
            if not out.get("skipped") and not out["bad_data"]:
                k_ = updates[0]
                d = min(decay, (1.0 + k_) / (10.0 + k_)) if warmup else decay
                for n, m in zip(names, _full_masters(trainer.engine)):
                    assert m.dtype == torch.float32
                    ref[n].lerp_(m.to(ref[n].device), 1.0 - d)
                updates[0] += 1
            return out

        trainer.step = step
        assert trainer.fit() == 0
        trainer.ema.sync(list(trainer.engine.module.buffers()))
        got = trainer.ema.state_tensors()
    finally:
        end_trainer()
    assert updates[0] == steps
    for n in names:
        torch.testing.assert_close(got[n], ref[n].cpu(), rtol=1e-6, atol=1e-7, msg=n)


def test_fault_protocol_with_two_ranks_on_the_gpu(setup, tmp_path, record_property):
    """Rank 1 raises in round 2 of a Γ job on the GPU: both ranks end (status 1) within 30 s, rank
    0 naming rank 1; NCCL where it takes two ranks on one device, else gloo (CPU runs show gloo)."""
    from adpm_dist.stages import job
    from tests.estimate_helpers import launch_ranks

    argv = ["--checkpoint", setup["model"], "--data", setup["data"], *GAMMA_ARGS, "--flush-every", "1",
            "--out", str(tmp_path / "g.json")]
    backend, ranks = "nccl", launch_ranks(2, "adpm_dist.estimate", argv, {job.FAIL_RANK_ENV: "1:2"})
    if any("Duplicate GPU" in r[2] or "ncclInvalidUsage" in r[2] for r in ranks):
        backend = "gloo"
        env = {job.FAIL_RANK_ENV: "1:2", "ADPM_DIST_BACKEND": "gloo"}
        ranks = launch_ranks(2, "adpm_dist.estimate", argv, env)
    record_property("fault_protocol_backend", backend)
    codes, times = [r[0] for r in ranks], [r[1] for r in ranks]
    assert codes == [1, 1], [r[2][-2000:] for r in ranks]
    assert "injected failure" in ranks[1][2] and "rank 1 failed" in ranks[0][2]
    assert max(times) - min(times) < 30
