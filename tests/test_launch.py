"""The launcher without a cluster: options, and N × G real processes on this machine.

Local runs are real torch.distributed (gloo) groups started by the launcher; the
selftest stage proves who joined (ranks, node ranks, the all-reduce sum).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from adpm_dist.errors import UsageError
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
    with pytest.raises(UsageError, match=words):
        launch.parse_args(argv)
    # Through main: one "error:" line, exit 2, no traceback.
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_no_cluster_is_a_user_error_and_bugs_are_not(monkeypatch, capsys):
    from adpm_dist.launch import slurm

    monkeypatch.setattr(slurm, "slurm_reachable", lambda: (False, "controller DOWN"))
    assert launch.main(["selftest", "--cluster", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --cluster slurm: no SLURM reachable")

    def broken(spec, folder, threads):
        raise ValueError("internal bug in the launcher")

    monkeypatch.setattr(launch, "submit_slurm", broken)
    with pytest.raises(ValueError, match="internal bug"):
        launch.main(["selftest", "--cluster", "slurm"])
    assert "error:" not in capsys.readouterr().err


# ---------------------------------------------------------------- the stage's own checks, before submitting

SAMPLE = ["--checkpoint", "m.safetensors", "--method", "ddim", "--steps", "3", "--num-samples", "2",
          "--out", "o"]
NLL = ["nll", "--checkpoint", "m", "--data", "d", "--steps", "3", "--out", "o"]


def _never(what: str):
    def reached(*args, **kwargs):
        raise AssertionError(f"{what} was reached: the typo was not caught before it")
    return reached


@pytest.mark.parametrize("stage, argv, named", [
    ("sample", [*SAMPLE, "--stpes", "3"], "adpm_dist.sample: unrecognized arguments: --stpes"),
    ("sample", [*SAMPLE, "stpes=3"], "override 'stpes=3': unknown key 'stpes' (did you mean 'steps'?)"),
    ("estimate", ["--checkpoint", "m", "--data", "d", "--out", "o", "--batch-size", "0"],
     "adpm_dist.estimate: argument --batch-size: 0: must be >= 1"),
    ("evaluate", [*NLL, "--methods", "ddim"], "--methods: the ELBO is defined for"),
    ("evaluate", ["nll", "--config", "/nonexistent/n.yaml"], "--config /nonexistent/n.yaml: file not found"),
    ("sample", [*SAMPLE, "--method", "ddpm-tilde", "--eta", "0.5"], "--method ddpm-tilde has no η"),
    ("train", ["--preset", "tiny", "optim.lrr=1e-3"],
     "override 'optim.lrr=1e-3': unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    ("train", ["--preset", "tiny", "data.batch_size=0"], "config key 'data.batch_size'=0 must be >= 1"),
])
@pytest.mark.parametrize("cluster", ["local", "slurm", "auto"])
def test_a_typo_is_refused_before_anything_is_submitted_or_started(stage, argv, named, cluster, tmp_path,
                                                                   monkeypatch, capsys):
    # Spies that fail the test if reached: no local process, no SLURM contact, no submission.
    monkeypatch.setattr(launch, "run_local", _never("run_local"))
    monkeypatch.setattr(launch, "submit_slurm", _never("submit_slurm"))
    monkeypatch.setattr(launch, "slurm_reachable", _never("slurm_reachable"))
    logs = tmp_path / "logs"
    assert launch.main([stage, "--cluster", cluster, "--log-dir", str(logs), "--", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not logs.exists()  # no run folder either


def test_the_checks_read_no_data_and_module_is_not_checked(tmp_path):
    from adpm_dist.launch import task
    from adpm_dist.train.config import preset_path

    gone = "/nonexistent/adpm"
    task.check_stage_argv("estimate", ["--checkpoint", f"{gone}/run", "--data", f"{gone}/d", "--out", "o"])
    task.check_stage_argv("sample", ["--checkpoint", f"{gone}/run", "--gamma", f"{gone}/g.json",
                                     "--method", "analytic-ddpm", "--steps", "3", "--num-samples", "2",
                                     "--out", f"{gone}/s"])
    task.check_stage_argv("evaluate", ["nll", "--checkpoint", f"{gone}/run", "--gamma", f"{gone}/g.json",
                                       "--data", f"{gone}/d", "--steps", "3,5", "--out", "o"])
    task.check_stage_argv("train", ["--config", str(preset_path("tiny")), f"data.urls=[{gone}/*.tar]"])
    task.check_stage_argv("module", ["no.such.module", "--anything", "goes"])
    assert not Path(gone).exists()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_valid_config_goes_through_unchanged_to_the_stage(tmp_path):
    from tests.estimate_helpers import save_tiny_model

    model, out = str(tmp_path / "m.safetensors"), tmp_path / "s"
    save_tiny_model(model)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"checkpoint: {model}\nmethod: ddim\nsteps: 3\nnum_samples: 3\nout: {out}\n")
    res = run_launch(["sample", "--cluster", "local", "--nodes", "2", "--log-dir", str(tmp_path / "logs"),
                      "--", "--config", str(cfg), "seed=4", "--no-progress"], timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    recorded = json.loads((out / "config.json").read_text())
    assert (recorded["seed"], recorded["num_samples"], recorded["no_progress"]) == (4, 3, True)


# ---------------------------------------------------------------- following a SLURM job


class _FakeJob:
    """What follow_slurm reads of a submitit job: ids, log paths, the job folder."""

    def __init__(self, folder: Path) -> None:
        self.job_id, self.num_tasks = "4242", 2
        self.paths = SimpleNamespace(folder=folder)
        self.watcher = SimpleNamespace(get_state=lambda job_id, mode: "FAILED")

    def task(self, rank: int):
        return SimpleNamespace(paths=SimpleNamespace(
            stdout=self.paths.folder / f"{self.job_id}_{rank}_log.out",
            stderr=self.paths.folder / f"{self.job_id}_{rank}_log.err"))


@pytest.mark.parametrize("record, restarts, expected", [
    (None, 0, 1),  # the log says "requeue", nothing recorded: a failure
    (("left", 0), 0, REQUEUE_EXIT_CODE),  # checkpointed, job no longer RUNNING: rerun
    (("requeued", 0), 1, REQUEUE_EXIT_CODE),  # requeued, then cancelled while pending
    (("requeued", 0), 2, 1),  # a record of an earlier run: the latest run just failed
    (("refused", 0), 0, 1),
])
def test_follow_decides_requeue_from_the_record_not_the_log(tmp_path, monkeypatch, record,
                                                            restarts, expected):
    from adpm_dist.launch import slurm, task

    job = _FakeJob(tmp_path)
    job.task(0).paths.stdout.write_text("step 7: lr warm-up; will requeue if preempted\n"
                                        "[launch] requeue requested\n")
    if record is not None:
        task.write_requeue_record(tmp_path, job.job_id, record[1], record[0], "test")
    monkeypatch.setattr(slurm, "slurm_job_view", lambda job_id: ("FAILED", "", restarts))
    monkeypatch.setattr(slurm, "_task_records", lambda job: {})
    outcome = slurm.follow_slurm(job, poll_s=0.01)
    assert outcome.status == expected, outcome.message
    assert "ended FAILED" in outcome.message


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_other_ranks_leave_as_soon_as_rank0_recorded_its_requeue(tmp_path, monkeypatch):
    import threading

    from adpm_dist.launch import task

    monkeypatch.setattr(task, "_job_folder", lambda: tmp_path)
    task.write_requeue_record(tmp_path, "77", 0, "requeued", "earlier run")  # stale: restart 0
    later = threading.Timer(0.5, task.write_requeue_record,
                            (tmp_path, "77", 1, "requeued", "this run"))
    t0 = time.monotonic()
    later.start()
    task._wait_for_rank0("77", restart=1, timeout_s=30)
    waited = time.monotonic() - t0
    later.join()
    assert 0.4 < waited < 5  # not released by the stale record, not held for the timeout
    t0 = time.monotonic()
    task._wait_for_rank0("78", restart=0, timeout_s=0.5)  # rank 0 never wrote: bounded
    assert time.monotonic() - t0 < 3
