"""The launcher without a cluster: options, and N × G real processes on this machine.

Local runs are real torch.distributed (gloo) groups started by the launcher; the
selftest stage proves who joined (ranks, node ranks, the all-reduce sum).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from adpm_dist.io.preempt import REQUEUE_EXIT_CODE
from adpm_dist.launch import cli as launch
from tests.slurm_cluster import run_launch

# ---------------------------------------------------------------- options


def test_stage_arguments_pass_through_untouched():
    spec = launch.parse_args(["train", "--nodes", "2", "--gpus-per-node", "4", "--time", "30",
                              "--", "--config", "c.yaml", "--time", "x", "a.b=1"])
    assert spec.stage == "train" and spec.nodes == 2 and spec.time_min == 30
    assert spec.stage_argv == ["--config", "c.yaml", "--time", "x", "a.b=1"]
    assert spec.procs_per_node == 4 and spec.world_size == 8


def test_unknown_arguments_without_dashdash_go_to_the_stage_in_order():
    spec = launch.parse_args(["estimate", "--nodes", "3", "--config", "c.yaml", "k=v",
                              "--tasks-per-node", "2"])
    assert spec.stage_argv == ["--config", "c.yaml", "k=v"]
    assert spec.procs_per_node == 2 and spec.world_size == 6 and spec.gpus_per_node == 0


@pytest.mark.parametrize("argv, words", [
    (["train", "--gpus-per-node", "2", "--tasks-per-node", "3"], "conflicts"),
    (["train", "--nodes", "0"], "--nodes"),
    (["nosuchstage"], "invalid choice"),
])
def test_bad_options_are_refused_with_the_reason(argv, words, capsys):
    with pytest.raises(SystemExit) as err:
        launch.parse_args(argv)
    assert err.value.code == 2
    assert words in capsys.readouterr().err


def test_plan_is_forwarded_to_plan_main(capsys):
    from adpm_dist.stages import plan

    with pytest.raises(SystemExit) as direct:
        plan.main(["--help"])
    expected = capsys.readouterr().out
    with pytest.raises(SystemExit) as forwarded:
        launch.main(["plan", "--help"])
    assert forwarded.value.code == direct.value.code == 0
    assert capsys.readouterr().out == expected and "usage" in expected


# ---------------------------------------------------------------- local processes


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.timeout(120)
def test_local_two_nodes_by_two_tasks_form_one_group(tmp_path):
    out = tmp_path / "report.json"
    res = run_launch(["selftest", "--cluster", "local", "--nodes", "2", "--tasks-per-node", "2",
                      "--log-dir", str(tmp_path / "logs"), "--", "--out", str(out)], timeout=110)
    assert res.returncode == 0, res.stdout + res.stderr
    rep = _report(out)
    assert rep["ok"] and rep["world_size"] == 4 and rep["backend"] == "gloo"
    assert rep["allreduce_sum"] == 10.0  # 1 + 2 + 3 + 4
    ranks = sorted(rep["ranks"], key=lambda r: r["rank"])
    assert [(r["node_rank"], r["local_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({r["pid"] for r in ranks}) == 4
    assert "4 local processes" in res.stdout
    assert len(list((tmp_path / "logs").glob("selftest-*/rank*.log"))) == 4


@pytest.mark.timeout(120)
def test_local_crash_of_one_rank_is_an_error_not_a_hang(tmp_path):
    # Rank 1 raises before joining; rank 0 waits in the rendezvous (120 s timeout)
    # unless the launcher ends it.
    t0 = time.monotonic()
    res = run_launch(["selftest", "--cluster", "local", "--nodes", "2", "--log-dir",
                      str(tmp_path), "--", "--crash-rank", "1"], timeout=110)
    elapsed = time.monotonic() - t0
    assert res.returncode == 1, res.stdout + res.stderr
    assert "local rank 1 exited with status 1" in res.stdout
    assert "rank 1 crashes on purpose" in res.stdout  # the log tail names the cause
    assert elapsed < 60


@pytest.mark.timeout(120)
def test_local_requeue_reruns_the_same_argv_and_completes(tmp_path):
    marker, out = tmp_path / "preempted.json", tmp_path / "report.json"
    res = run_launch(["selftest", "--cluster", "local", "--nodes", "2", "--log-dir",
                      str(tmp_path / "logs"), "--", "--preempt-once", str(marker),
                      "--out", str(out)], timeout=110)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(marker.read_text())["preempted_by"] == "simulated"
    rep = _report(out)
    assert rep["ok"] and rep["preempted_before"]["preempted_by"] == "simulated"
    log = next((tmp_path / "logs").glob("selftest-*/rank0.log")).read_text()
    assert "attempt 0 rank 0" in log and "attempt 1 rank 0" in log
    assert f"exit {REQUEUE_EXIT_CODE} to requeue" in log


@pytest.mark.timeout(60)
def test_single_process_selftest_needs_no_launcher(tmp_path, capsys):
    from adpm_dist.stages import selftest

    assert selftest.main(["--out", str(tmp_path / "r.json")]) == 0
    rep = _report(tmp_path / "r.json")
    assert rep["ok"] and rep["world_size"] == 1 and rep["allreduce_sum"] == 1.0


@pytest.mark.timeout(120)
def test_local_run_passes_sigterm_on_and_stops_for_a_rerun(tmp_path):
    """SIGTERM to the launcher reaches every rank; the stage checkpoints; no restart."""
    from tests.slurm_cluster import start_launch, wait_for

    marker, log = tmp_path / "preempted.json", tmp_path / "launch.txt"
    proc = start_launch(["selftest", "--cluster", "local", "--nodes", "2", "--log-dir",
                         str(tmp_path / "logs"), "--", "--preempt-once", str(marker),
                         "--hold", "90"], log)
    try:
        rank0 = wait_for(lambda: next((tmp_path / "logs").glob("selftest-*/rank0.log"), None),
                         60, "the rank-0 log")
        wait_for(lambda: "holding" in rank0.read_text(), 60, "the selftest to hold")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == REQUEUE_EXIT_CODE, log.read_text()
    assert "stopped by SIGTERM" in log.read_text() and "rerun" in log.read_text()
    assert json.loads(marker.read_text())["preempted_by"] == "signal SIGTERM"
    assert "attempt 1" not in rank0.read_text()  # a stop asked for by the user is not requeued
