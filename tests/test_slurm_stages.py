"""Real stages through the launcher on the two-node SLURM cluster, against local runs.

For each stage case, ``launch STAGE --nodes 2 --cluster slurm`` and
``launch STAGE --nodes 2 --cluster local`` run the same argv into separate
output folders, and what they wrote must be equal. Training is also preempted
mid-run by SLURM's time-limit signal (SIGUSR1): it checkpoints, the job requeues
itself, resumes, and ends with the same weights as the uninterrupted local run.

Adding a stage: write ``prepare`` (inputs, once per module), ``argv`` (the stage
arguments for one output folder) and ``read`` (what to compare, as a dict of
tensors/arrays), then add a ``StageCase`` to ``CASES``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from adpm_dist.train.run_dir import read_metrics
from tests.slurm_cluster import run_launch, start_launch, submitted_job, wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("slurm_cluster")


@dataclass(frozen=True)
class StageCase:
    stage: str
    prepare: Callable[[Path], dict]  # inputs folder → context for argv
    argv: Callable[[dict, Path], list[str]]  # (context, output folder) → stage arguments
    read: Callable[[Path], dict]  # output folder → name → tensor/array to compare
    rtol: float = 0.0  # 0: bit-equal; float64 sums may differ in the last bits
    # output folder → what the stage's final line (the launcher shows it on success) names
    summary: Callable[[Path], str] | None = None


# ---------------------------------------------------------------- train

TRAIN_STEPS = 6


def _digit_shards(folder: Path) -> str:
    out = folder / "digits"
    if not (out / "manifest.json").exists():
        sys.path.insert(0, str(ROOT / "tools"))
        import make_shards

        make_shards.main(["digits", str(out), "--shard-size", "400"])
    return str(out / "train-*.tar")


def _train_argv(ctx: dict, out: Path, steps: int = TRAIN_STEPS) -> list[str]:
    from adpm_dist.train.config import preset_path

    return ["--config", str(preset_path("tiny")), f"data.urls=[{ctx['shards']}]",
            f"train.run_dir={out}", f"train.total_steps={steps}", "train.ckpt_every=100",
            "train.log_every=1", "data.batch_size=8", "train.progress=false"]


def _train_read(out: Path) -> dict:
    from adpm_dist.models.io import model_from_bytes

    latest = json.loads((out / "latest.json").read_text())
    ema, meta = model_from_bytes((out / latest["ema"]).read_bytes())
    return {"step": torch.tensor(meta["step"]), **ema.state_dict()}


TRAIN = StageCase("train", lambda d: {"shards": _digit_shards(d)}, _train_argv, _train_read)

# ---------------------------------------------------------------- estimate (Γ)


def _estimate_prepare(folder: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from estimate_helpers import make_digit_shards, save_tiny_model

    data = make_digit_shards(str(folder / "eval"), limit=120, shard_size=12)
    model = str(folder / "model.safetensors")
    save_tiny_model(model, num_timesteps=20)
    return {"data": data, "model": model}


def _estimate_argv(ctx: dict, out: Path) -> list[str]:
    return ["--checkpoint", ctx["model"], "--data", ctx["data"], "--out",
            str(out / "gamma.json"), "--batch-size", "64", "--num-workers", "0",
            "--no-progress"]


def _estimate_read(out: Path) -> dict:
    from adpm_dist.gamma import read_gamma

    g = read_gamma(str(out / "gamma.json"))
    return {"sum": g.sum, "sum_sq": g.sum_sq, "count": g.count}


ESTIMATE = StageCase("estimate", _estimate_prepare, _estimate_argv, _estimate_read, rtol=1e-12,
                     summary=lambda out: str(out / "gamma.json"))

CASES = [TRAIN, ESTIMATE]

# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stage-inputs")


def _launch(case: StageCase, ctx: dict, out: Path, cluster: str, logs: Path):
    args = [case.stage, "--nodes", "2", "--cluster", cluster, "--time", "10", "--log-dir",
            str(logs), "--wait", "--wait-timeout", "200", "--", *case.argv(ctx, out)]
    res = run_launch(args, timeout=230)
    assert res.returncode == 0, f"{cluster}:\n{res.stdout}\n{res.stderr}"
    return res


def _assert_equal(a: dict, b: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Equal arrays under the same names (bit-equal with the default tolerances)."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.shape == y.shape, k
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=[c.stage for c in CASES])
def test_two_slurm_nodes_write_what_a_local_run_writes(case, inputs, tmp_path):
    ctx = case.prepare(inputs)
    res = _launch(case, ctx, tmp_path / "slurm", "slurm", tmp_path / "logs")
    assert "as SLURM job" in res.stdout and "completed (2 tasks)" in res.stdout
    local = _launch(case, ctx, tmp_path / "local", "local", tmp_path / "logs")
    if case.summary:  # the stage's own last line follows the launcher's success line
        for run, prefix, out in ((res, "[launch] rank 0: ", "slurm"), (local, f"[launch] {case.stage}: ",
                                                                      "local")):
            shown = [ln for ln in run.stdout.splitlines() if ln.startswith(prefix)]
            assert shown and case.summary(tmp_path / out) in shown[-1], run.stdout
    _assert_equal(case.read(tmp_path / "slurm"), case.read(tmp_path / "local"), case.rtol)


@pytest.mark.timeout(300)
def test_preempted_training_requeues_resumes_and_matches_an_uninterrupted_run(inputs, tmp_path,
                                                                               slurm_cluster):
    steps = 30
    ctx = TRAIN.prepare(inputs)
    run, log = tmp_path / "slurm", tmp_path / "launch.txt"
    proc = start_launch(["train", "--nodes", "2", "--cluster", "slurm", "--time", "10",
                         "--log-dir", str(tmp_path / "logs"), "--wait", "--wait-timeout", "200",
                         "--", *_train_argv(ctx, run, steps)], log)
    try:
        job, rank0 = wait_for(lambda: submitted_job(log), 60, "the job id")
        parts = run / "metrics"
        wait_for(lambda: sum(len(p.read_text().splitlines()) for p in parts.glob("*.jsonl")) >= 3,
                 120,
                 "training to make progress")
        slurm_cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@T sends
        rc = proc.wait(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 0, text
    assert "requeued 1×" in text
    assert f"requeued job {job} (restart 1)" in rank0.read_text()
    resumed = [m["step"] for m in read_metrics(str(run))]
    assert resumed == list(range(1, steps + 1))  # each step logged once: none lost or repeated
    # Rank 0's log: the checkpoint at the signal, then the rerun starting from it.
    err0 = rank0.with_name(rank0.name.replace("_log.out", "_log.err")).read_text()
    stopped = int(err0.split("preempted (SIGUSR1): checkpointed step ")[1].split(";")[0])
    assert 0 < stopped < steps
    assert f"resumed at step {stopped} of {steps}" in err0

    local = tmp_path / "local"
    res = run_launch(["train", "--nodes", "2", "--cluster", "local", "--log-dir",
                      str(tmp_path / "logs"), "--", *_train_argv(ctx, local, steps)], timeout=230)
    assert res.returncode == 0, res.stdout + res.stderr
    _assert_equal(_train_read(run), _train_read(local), rtol=1e-6, atol=1e-7)
