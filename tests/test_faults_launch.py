"""Launcher faults on this machine: why a rank failed and which failed first, the threads
each rank gets, rank 0's progress while it runs, its summary when it is done, --help.

Local runs are real process groups started by ``python -m adpm_dist.launch``. This
module is also the probe those runs launch (``launch module -- tests.test_faults_launch
...``, see :func:`main`): each rank reports the threads it really got, and rank 0 prints
``progress:`` lines as the stages do, then a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import run_launch, start_launch, wait_for

# ---------------------------------------------------------------- the probe (runs in each rank)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads-out", help="folder: each rank writes rank<R>.json with its threads")
    p.add_argument("--progress", type=int, default=0, help="steps, one progress line each")
    p.add_argument("--interval", type=float, default=0.5, help="seconds per step")
    args = p.parse_args(argv)
    import torch

    rank = int(os.environ.get("RANK", 0))
    if args.threads_out:
        Path(args.threads_out, f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "torch_threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS"), "mkl": os.environ.get("MKL_NUM_THREADS")}))
    for i in range(1, args.progress + 1):
        time.sleep(args.interval)
        if rank == 0:  # the format of adpm_dist/train/progress.py
            left = int((args.progress - i) * args.interval)
            print(f"progress: probe {i}/{args.progress} ({100 * i // args.progress}%) "
                  f"{1 / args.interval:.1f}/s ETA 0:00:{left:02d}", flush=True)
    if rank == 0:
        print(json.dumps({"probe": "done", "steps": args.progress}, indent=2), flush=True)
    return 0


# ---------------------------------------------------------------- helpers


def pid_of(rank_var: str, rank: int, marker: str) -> int | None:
    """The pid of the process whose command line names ``marker`` and whose ``rank_var`` is ``rank``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmd and f"{rank_var}={rank}".encode() in env:
            return int(proc.name)
    return None


def thread_reports(folder: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in folder.glob("rank*.json")}


def expected_local_threads(ranks: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // ranks)


# ---------------------------------------------------------------- why a rank failed


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_local_stage_user_error_is_shown_and_exits_2(tmp_path):
    res = run_launch(["selftest", "--cluster", "local", "--nodes", "2", "--log-dir", str(tmp_path),
                      "--", "--no-such-flag"], timeout=110)
    assert res.returncode == 2, res.stdout + res.stderr
    assert ("exited with status 2 (first to fail): error: python -m adpm_dist.stages.selftest: "
            "unrecognized arguments: --no-such-flag") in res.stdout
    if "then failed" in res.stdout:  # the peer's identical error is not repeated
        assert "then failed the same way" in res.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_local_kill_9_names_the_killed_rank_not_the_peer_that_lost_it(tmp_path):
    marker, log = tmp_path / "preempted.json", tmp_path / "launch.txt"
    proc = start_launch(["selftest", "--cluster", "local", "--nodes", "2", "--log-dir",
                         str(tmp_path / "logs"), "--", "--preempt-once", str(marker), "--hold", "90"],
                        log)
    try:
        rank0 = wait_for(lambda: next((tmp_path / "logs").glob("selftest-*/rank0.log"), None), 60,
                         "the rank-0 log")
        wait_for(lambda: "holding" in rank0.read_text(), 60, "the selftest to hold")
        os.kill(wait_for(lambda: pid_of("RANK", 1, str(marker)), 10, "rank 1's pid"), signal.SIGKILL)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 1, text
    # Rank 0 fails too (gloo: connection closed), possibly before the launcher polls rank 1.
    assert "local rank 1 was killed by signal 9 (first to fail, SIGKILL)" in text
    assert "local rank 0 then failed: RuntimeError" in text


# ---------------------------------------------------------------- threads per rank


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra, env, source", [
    ([], {}, "cores ÷ 2 local ranks"),
    (["--threads-per-rank", "3"], {}, "--threads-per-rank"),
    ([], {"OMP_NUM_THREADS": "2"}, "OMP_NUM_THREADS"),
])
@pytest.mark.slow
def test_local_ranks_get_and_use_their_share_of_threads(tmp_path, extra, env, source):
    out = tmp_path / "threads"
    out.mkdir()
    res = run_launch(["module", "--cluster", "local", "--nodes", "2", "--log-dir", str(tmp_path),
                      *extra, "--", "tests.test_faults_launch", "--threads-out", str(out)],
                     timeout=110, **{"OMP_NUM_THREADS": None, **env})
    assert res.returncode == 0, res.stdout + res.stderr
    want = 3 if extra else int(env.get("OMP_NUM_THREADS", expected_local_threads(2)))
    assert f"[launch] threads per rank: {want} (from " in res.stdout and source in res.stdout
    reports = thread_reports(out)
    assert sorted(reports) == [0, 1]
    for rep in reports.values():
        assert rep["torch_threads"] == want and rep["omp"] == rep["mkl"] == str(want), rep


# ---------------------------------------------------------------- progress and summary


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_local_run_relays_rank0_progress_and_ends_with_its_summary(tmp_path):
    res = run_launch(["module", "--cluster", "local", "--nodes", "2", "--log-dir", str(tmp_path),
                      "--", "tests.test_faults_launch", "--progress", "8", "--interval", "0.5"],
                     timeout=110)
    assert res.returncode == 0, res.stdout + res.stderr
    relayed = [ln for ln in res.stderr.splitlines() if " — progress: probe " in ln]
    assert len(relayed) >= 3, res.stderr  # one line per new progress line, while it runs
    assert relayed[0].split("progress: ")[1] != relayed[-1].split("progress: ")[1]
    assert '[launch] module: {"probe": "done", "steps": 8}' in res.stdout


# ---------------------------------------------------------------- the command line


def test_help_says_what_each_flag_does_and_its_default():
    from adpm_dist.launch.cli import build_parser

    thin = [a.option_strings[0] for a in build_parser()._actions
            if a.option_strings and a.option_strings[0] != "-h"
            and ("default" not in (a.help or "").lower() or len(a.help) < 40)]
    assert not thin, f"flags whose help is thin or does not give the default: {thin}"


def test_module_stage_needs_a_module(capsys):
    from adpm_dist.launch import cli

    assert cli.main(["module", "--cluster", "local", "--", "--flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: stage 'module' needs the module")
    assert cli.main(["module", "--cluster", "local", "--", "no_such_pkg.mod"]) == 2
    assert "no module no_such_pkg.mod" in capsys.readouterr().err


# ---------------------------------------------------------------- reading the logs


SRUN_ERR = """\
[launch] selftest rank 0/2 on n1 (master n1:20019), pid 7445
threads per rank: 1 (from SLURM_CPUS_ON_NODE=1 ÷ 1 task(s))
srun: error: n2: task 1: Killed
srun: launch/slurm: _step_signal: Terminating StepId=19.0
slurmstepd-n1: error: *** STEP 19.0 ON n1 CANCELLED AT 2026-12-01T15:57:34 ***
[rank0]: Traceback (most recent call last):
[rank0]:   File "selftest.py", line 74, in _any_rank
[rank0]: RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:31136.
srun: error: n1: task 0: Exited with exit code 1
srun: error: n1: tasks 2-3,5: Terminated
srun: Force Terminated StepId=19.0
"""


def test_srun_report_is_read_in_order_and_stale_runs_are_ignored():
    from adpm_dist.launch.slurm import srun_verdicts

    stale = "srun: error: n1: task 0: Exited with exit code 75\n"
    assert srun_verdicts(stale + SRUN_ERR) == [(1, None, 9, False), (0, 1, None, True),
                                               (2, None, 15, True), (3, None, 15, True),
                                               (5, None, 15, True)]


def test_first_failure_is_the_killed_rank_and_its_peers_are_consequences():
    from adpm_dist.launch.report import RankEnd, describe_failure, key_line

    why0 = key_line(SRUN_ERR)
    assert why0.startswith("RuntimeError: [pair.cc:553] Connection closed by peer")
    status, text = describe_failure([RankEnd(0, 1, why=why0), RankEnd(1, signal=9)], "task")
    assert status == 1
    assert text.startswith("task 1 was killed by signal 9 (first to fail, SIGKILL); "
                           "task 0 then failed: RuntimeError: [pair.cc:553] Connection closed")
    # A stage's user error (exit 2) first: the launcher exits 2 and shows the stage's line.
    status, text = describe_failure([RankEnd(1, 2, why="error: bad key 'x'"), RankEnd(0, 1)], "task")
    assert status == 2 and text == ("task 1 exited with status 2 (first to fail): error: bad key 'x'; "
                                    "task 0 then exited with status 1")
    same = describe_failure([RankEnd(1, 2, why="error: bad key 'x'"),
                             RankEnd(0, 2, why="error: bad key 'x'")], "task")[1]
    assert same.endswith("error: bad key 'x'; task 0 then failed the same way")


def test_summary_is_the_stages_last_line_and_a_json_report_is_compacted(tmp_path):
    from adpm_dist.launch.report import latest_progress, stage_summary

    log = tmp_path / "rank0.log"
    log.write_text("[launch] attempt 0 rank 0\nprogress: gamma 1/2 (50%) 3.0/s ETA 0:00:01\n"
                   "progress: gamma 2/2 (100%) 3.0/s ETA 0:00:00\nwrote g.json: Γ for t = 1..20\n")
    assert stage_summary(log) == "wrote g.json: Γ for t = 1..20"
    assert latest_progress(log) == "progress: gamma 2/2 (100%) 3.0/s ETA 0:00:00"
    log.write_text(json.dumps({"ok": True, "ranks": [{"rank": 0}, {"rank": 1}]}, indent=2)
                   + "\nsubmitit INFO (2026-12-01) - Job completed successfully\n")
    assert stage_summary(log) == '{"ok": true, "ranks": [{"rank": 0}, {"rank": 1}]}'

