"""Launcher faults on the real two-node loopback SLURM cluster (tests/slurm_cluster.py):
a stage's user error, a task killed with SIGKILL, threads per task, progress relayed
while the job runs and the stage's summary at the end. The probe stage is
tests/test_faults_launch.py's ``main``."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from tests.slurm_cluster import run_launch, start_launch, submitted_job, wait_for
from tests.test_faults_launch import pid_of, thread_reports

pytestmark = pytest.mark.usefixtures("slurm_cluster")


def _launch(tmp_path, stage: str, *args: str, timeout: float = 110, **env: str | None
            ) -> subprocess.CompletedProcess:
    return run_launch([stage, "--cluster", "slurm", "--nodes", "2", "--time", "5", "--wait",
                       "--wait-timeout", str(timeout - 20), "--log-dir", str(tmp_path / "logs"),
                       *args], timeout=timeout, **env)


@pytest.mark.timeout(180)
def test_stage_user_error_on_slurm_shows_the_stages_error_line_and_exits_2(tmp_path):
    from adpm_dist.train.config import preset_path

    # Data that is missing is found by the stage on the cluster (launch checks only the
    # arguments before it submits; a typo never reaches SLURM: the second half).
    missing = tmp_path / "no-shards"
    res = _launch(tmp_path, "train", "--", "--config", str(preset_path("tiny")),
                  f"train.run_dir={tmp_path / 'run'}", f"data.urls=[{missing}/train-*.tar]")
    assert res.returncode == 2, res.stdout + res.stderr
    # The first task to end shows the stage's own error: raised there, or reported by the rank
    # that raised it (the failure protocol's store report can reach a peer before that rank exits).
    first = res.stdout[res.stdout.index("(first to fail): "):].split("\n", 1)[0]
    assert re.match(r"\(first to fail\): error: (rank \d failed: ConfigError: )?config key 'data.urls': "
                    "shard pattern ", first), first
    assert f"'{missing}/train-*.tar'" in first
    typo = _launch(tmp_path, "train", "--", "--config", str(preset_path("tiny")), "nosuch.key=1")
    assert typo.returncode == 2, typo.stdout + typo.stderr
    assert "override 'nosuch.key=1': unknown config key 'nosuch'" in typo.stderr
    assert "submitted" not in typo.stdout


@pytest.mark.timeout(150)
def test_kill_9_of_a_task_names_it_first_not_the_peer_that_lost_it(tmp_path):
    marker, log = tmp_path / "preempted.json", tmp_path / "launch.txt"
    proc = start_launch(["selftest", "--cluster", "slurm", "--nodes", "2", "--time", "5", "--wait",
                         "--wait-timeout", "100", "--log-dir", str(tmp_path / "logs"), "--",
                         "--preempt-once", str(marker), "--hold", "90"], log)
    try:
        job, rank0 = wait_for(lambda: submitted_job(log), 60, "the job id")
        wait_for(lambda: rank0.exists() and "holding" in rank0.read_text(), 60,
                 "the selftest to hold")
        # Both "nodes" are this machine: task 1 is the submitit process with SLURM_PROCID=1.
        pid = wait_for(lambda: pid_of("SLURM_PROCID", 1, str(rank0.parent)), 10, "task 1's pid")
        os.kill(pid, signal.SIGKILL)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 1, text
    assert f"job {job}: task 1 was killed by signal 9 (first to fail, SIGKILL)" in text
    report = text[text.index(f"job {job}: task 1 was killed"):]
    # Task 0 is a consequence. How it ended depends on timing: usually gloo's closed connection
    # reaches it first; on a loaded machine srun's --kill-on-bad-exit may stop it before that.
    if "task 0 then" in report:
        assert ("failed: RuntimeError" in report and "Connection closed" in report) or "signal" in report
    assert "task 0 " not in text[:text.index(f"job {job}: task 1 was killed")]


@pytest.mark.timeout(150)
def test_tasks_get_slurms_cpus_as_threads_and_progress_and_summary_are_relayed(tmp_path):
    out = tmp_path / "threads"
    out.mkdir()
    res = _launch(tmp_path, "module", "--", "tests.test_faults_launch", "--threads-out", str(out),
                  "--progress", "8", "--interval", "1", timeout=140, OMP_NUM_THREADS=None)
    assert res.returncode == 0, res.stdout + res.stderr
    # One task per node and no --cpus-per-task: SLURM gives each task one CPU.
    assert "[launch] rank 0: threads per rank: 1 (from SLURM_CPUS_ON_NODE=1 ÷ 1 task(s))" in res.stdout
    reports = thread_reports(out)
    assert sorted(reports) == [0, 1]
    assert all(r["torch_threads"] == 1 and r["omp"] == "1" for r in reports.values()), reports
    relayed = [ln for ln in res.stderr.splitlines() if "RUNNING (2 tasks) — progress: probe " in ln]
    assert len(relayed) >= 2, res.stderr
    assert '[launch] rank 0: {"probe": "done", "steps": 8}' in res.stdout


@pytest.mark.timeout(120)
def test_cpus_per_task_sets_the_threads_of_every_task(tmp_path):
    out = tmp_path / "threads"
    out.mkdir()
    res = _launch(tmp_path, "module", "--cpus-per-task", "2", "--", "tests.test_faults_launch",
                  "--threads-out", str(out), OMP_NUM_THREADS=None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[launch] threads per rank: 2 (from --cpus-per-task)" in res.stdout
    assert "[launch] rank 0: threads per rank: 2 (from SLURM_CPUS_PER_TASK)" in res.stdout
    assert [r["torch_threads"] for _, r in sorted(thread_reports(out).items())] == [2, 2]
