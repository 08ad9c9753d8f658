"""The launcher on a real two-node SLURM cluster (slurm/local-cluster.sh, loopback).

Jobs go through sbatch/srun/slurmd for real; the selftest stage reports which
SLURM node each rank ran on, so "two nodes" is SLURM's word, not ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import run_launch, start_launch, submitted_job, wait_for

pytestmark = pytest.mark.usefixtures("slurm_cluster")


def _selftest(tmp_path: Path, *stage_args: str, extra: tuple[str, ...] = (),
              timeout: float = 100) -> subprocess.CompletedProcess:
    return run_launch(["selftest", "--cluster", "slurm", "--nodes", "2", "--time", "5",
                       "--wait", "--wait-timeout", str(timeout - 10), "--log-dir",
                       str(tmp_path / "logs"), *extra, "--", *stage_args], timeout=timeout)


@pytest.mark.timeout(120)
def test_selftest_runs_one_rank_on_each_slurm_node(tmp_path, slurm_cluster):
    out = tmp_path / "report.json"
    res = _selftest(tmp_path, "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["world_size"] == 2 and rep["allreduce_sum"] == 3.0
    assert rep["nodes"] == ["n1", "n2"]  # SLURMD_NODENAME of each task
    ranks = sorted(rep["ranks"], key=lambda r: r["rank"])
    assert [r["slurm_node"] for r in ranks] == ["n1", "n2"]
    assert [r["node_rank"] for r in ranks] == [0, 1]
    job = ranks[0]["slurm_job_id"]
    assert rep["master"] == f"n1:{20000 + int(job) % 20000}"
    assert f"submitted selftest as SLURM job {job}" in res.stdout
    assert f"job {job} completed" in res.stdout
    # The sacct stand-in (what submitit polls) tells the same story as squeue.
    # submitit sees the tasks' results before slurmctld has finished the job's
    # epilog, so the job may still read RUNNING/COMPLETING for a moment.
    sacct_bin = str(Path(__file__).parents[1] / "adpm_dist" / "launch" / "bin" / "sacct")

    def sacct_lines():
        out = slurm_cluster.run(sacct_bin, "-o", "JobID,State,NodeList", "--parsable2",
                                "-j", job, "-j", "999999").stdout.splitlines()
        return out if out[1:] and "|COMPLETED|" in out[1] else None

    lines = wait_for(sacct_lines, 30, f"job {job} to read COMPLETED in sacct")
    assert lines == ["JobID|State|NodeList", f"{job}|COMPLETED|n[1-2]"]


@pytest.mark.timeout(120)
def test_crashing_task_is_reported_within_60s(tmp_path):
    # Rank 1 raises before joining the group: rank 0 would wait in the rendezvous.
    t0 = time.monotonic()
    res = _selftest(tmp_path, "--crash-rank", "1")
    elapsed = time.monotonic() - t0
    assert res.returncode == 1, res.stdout + res.stderr
    assert ("task 1 exited with status 1 (first to fail): RuntimeError: selftest: rank 1 crashes "
            "on purpose") in res.stdout
    assert "_1_log.err" in res.stdout  # where to look
    assert elapsed < 60


@pytest.mark.timeout(150)
def test_preemption_signal_requeues_and_the_rerun_completes(tmp_path, slurm_cluster):
    """The time-limit warning (SIGUSR1, as --signal sends it) → checkpoint → requeue → done."""
    marker, out, log = tmp_path / "preempted.json", tmp_path / "report.json", tmp_path / "l.txt"
    proc = start_launch(["selftest", "--cluster", "slurm", "--nodes", "2", "--time", "5",
                         "--wait", "--wait-timeout", "120", "--log-dir", str(tmp_path / "logs"),
                         "--", "--preempt-once", str(marker), "--hold", "90", "--out", str(out)],
                        log)
    try:
        job, rank0 = wait_for(lambda: submitted_job(log), 60, "the job id")
        wait_for(lambda: rank0.exists() and "holding" in rank0.read_text(), 60,
                 "the selftest to hold")
        slurm_cluster.run("scancel", "--signal=USR1", job)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 0, text
    assert json.loads(marker.read_text())["preempted_by"] == "signal SIGUSR1"
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["nodes"] == ["n1", "n2"]
    assert {r["slurm_job_id"] for r in rep["ranks"]} == {job}  # the same job, requeued
    assert {r["restart_count"] for r in rep["ranks"]} == {1}
    assert f"requeued job {job} (restart 1)" in rank0.read_text()
    assert "requeued 1×" in text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("option, reason", [
    (["--partition", "nosuch"], "invalid partition specified: nosuch"),
    (["--gpus-per-node", "1"], "Invalid generic resource (gres) specification"),
])
def test_rejected_submission_shows_slurms_reason(tmp_path, option, reason):
    res = run_launch(["selftest", "--cluster", "slurm", "--log-dir", str(tmp_path), *option],
                     timeout=50)
    assert res.returncode == 2
    assert "SLURM rejected the submission" in res.stderr and reason in res.stderr


@pytest.mark.timeout(60)
def test_no_reachable_controller_is_a_clear_error(tmp_path, slurm_cluster):
    # A real client against a port where no slurmctld listens.
    conf = tmp_path / "slurm.conf"
    lines = slurm_cluster.conf.read_text().splitlines()
    conf.write_text("\n".join(
        "SlurmctldPort=1" if ln.startswith("SlurmctldPort=") else
        "MessageTimeout=2" if ln.startswith("MessageTimeout=") else ln for ln in lines) + "\n")
    res = run_launch(["selftest", "--cluster", "slurm", "--log-dir", str(tmp_path)], timeout=50,
                     SLURM_CONF=str(conf))
    assert res.returncode == 2
    assert "no SLURM reachable" in res.stderr and "DOWN" in res.stderr
    assert "--cluster local" in res.stderr
    # auto falls back to this machine, and says why.
    res = run_launch(["selftest", "--log-dir", str(tmp_path), "--", "--out",
                      str(tmp_path / "r.json")], timeout=50, SLURM_CONF=str(conf))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no SLURM reachable" in res.stdout and "running on this machine" in res.stdout
    assert json.loads((tmp_path / "r.json").read_text())["ranks"][0]["slurm_job_id"] is None


@pytest.mark.timeout(60)
def test_no_slurm_client_installed_is_a_clear_error(tmp_path):
    res = run_launch(["selftest", "--cluster", "slurm"], timeout=50,
                     PATH=str(Path(sys.executable).parent))  # python only, no SLURM tools
    assert res.returncode == 2
    assert "'sbatch' is not on PATH" in res.stderr


@pytest.mark.timeout(60)
def test_cluster_script_reports_status(slurm_cluster):
    script = Path(__file__).parents[1] / "slurm" / "local-cluster.sh"
    res = subprocess.run(["bash", str(script), "status"], capture_output=True, text=True,
                         timeout=50, env={**os.environ,
                                          "ADPM_SLURM_STATE": str(slurm_cluster.state)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "slurmd n1: running" in res.stdout and "slurmd n2: running" in res.stdout
    assert "n1 debug* idle" in res.stdout or "n1 debug* mix" in res.stdout
