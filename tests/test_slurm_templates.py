"""The plain-sbatch templates (slurm/*.sbatch → slurm/run-stage.sh → srun → torchrun).

selftest.sbatch runs for real on the two loopback nodes, including its requeue
path: the batch shell gets the time-limit warning (SIGUSR1, as
``--signal=B:USR1@120`` sends it), stops the step with SIGTERM through torchrun,
and requeues the job, whose rerun completes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.slurm_cluster import wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("slurm_cluster")


def _state(cluster, job: str) -> str:
    return cluster.run("squeue", "--states=all", "-h", "-o", "%T", "-j", job).stdout.strip()


@pytest.mark.timeout(150)
def test_selftest_template_runs_torchrun_per_node_and_requeues(tmp_path, slurm_cluster):
    out, marker, log = tmp_path / "report.json", tmp_path / "preempted.json", tmp_path / "job.out"
    job = slurm_cluster.run(
        "sbatch", "--parsable", "--time=5", f"--output={log}", "--chdir", str(ROOT),
        str(ROOT / "slurm" / "selftest.sbatch"), "--out", str(out), "--preempt-once",
        str(marker), "--hold", "90").stdout.strip()
    try:
        wait_for(lambda: log.exists() and "holding" in log.read_text(), 90, "the selftest")
        slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
        final = wait_for(lambda: _state(slurm_cluster, job) in ("COMPLETED", "FAILED",
                                                                "CANCELLED", "TIMEOUT")
                         and _state(slurm_cluster, job), 100, "the job to end")
    finally:
        slurm_cluster.run("scancel", job, check=False)
    text = log.read_text()
    assert final == "COMPLETED", text
    assert "time limit near: asking selftest to checkpoint" in text
    assert f"requeueing job {job}" in text and "(restart 1)" in text
    # The workers got SIGTERM (from the step signal, and again from torchrun passing it
    # on) and checkpointed: the marker is their record.
    reason = json.loads(marker.read_text())["preempted_by"]
    assert reason.startswith("signal ") and set(reason[7:].split(",")) == {"SIGTERM"}
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["world_size"] == 2 and rep["source"] == "torchrun"
    assert rep["nodes"] == ["n1", "n2"]
    assert {r["restart_count"] for r in rep["ranks"]} == {1}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage", ["train", "estimate", "sample"])
def test_stage_templates_are_accepted_by_slurm(stage, slurm_cluster):
    """SLURM parses each template's #SBATCH lines and would schedule it (not run: --test-only)."""
    script = ROOT / "slurm" / f"{stage}.sbatch"
    assert f'run-stage.sh" {stage} "$@"' in script.read_text()
    res = slurm_cluster.run("sbatch", "--test-only", "--chdir", str(ROOT), str(script),
                            check=False)
    assert res.returncode == 0, res.stderr
    assert "to start at" in res.stderr  # sbatch --test-only answers on stderr
