"""What every rank of a launched job runs: a stage's ``main(argv)``, and the requeue on preemption.

:class:`StageTask` is what submitit pickles into the SLURM job (by reference, so
it lives in this importable module); local ranks run :func:`local_worker`. Both
limit the rank's threads (``adpm_dist/launch/threads.py``) and say so first in its log;
a stage that fails leaves with its own exit status, which srun reports.
A stage that checkpoints on ``PREEMPT_SIGNAL`` returns ``REQUEUE_EXIT_CODE``;
rank 0 then ``scontrol requeue``s the job, records what it did in
``<job_id>_requeue.json`` next to the logs, and every rank leaves without a result
record, so the launcher keeps following the same job id. The other ranks leave
as soon as that record appears (srun must not kill rank 0 before it requeued).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import submitit

from adpm_dist.errors import UsageError
from adpm_dist.io import dist
from adpm_dist.io.preempt import REQUEUE_EXIT_CODE
from adpm_dist.launch.threads import apply_threads, describe, slurm_threads

# Stages that run on the allocation; each module has main(argv) -> int.
STAGES = {
    "train": "adpm_dist.train.loop",
    "estimate": "adpm_dist.stages.estimate",
    "sample": "adpm_dist.stages.sample",
    "evaluate": "adpm_dist.stages.evaluate",
    "selftest": "adpm_dist.stages.selftest",
}
# Not a stage: runs main(argv) of the module named by the first stage argument.
MODULE_STAGE = "module"
PREEMPT_SIGNAL = signal.SIGUSR1  # what the job asks SLURM to send before its time limit


class StageFailed(RuntimeError):
    """A stage returned a failure status on one rank."""


class _Requeued(SystemExit):
    """This task leaves because its job was (or will not be) requeued; no result record.

    A SystemExit passes through submitit's error handling (which catches Exception),
    so no result file is written and the launcher keeps following the same job id.
    """

    def __init__(self) -> None:
        super().__init__(REQUEUE_EXIT_CODE)


def stage_module(stage: str, argv: list[str]) -> tuple[str, list[str]]:
    """(module to import, its argv) for ``stage``; ``module`` takes the name from ``argv``."""
    if stage != MODULE_STAGE:
        return STAGES[stage], list(argv)
    if not argv or argv[0].startswith("-"):
        raise UsageError("stage 'module' needs the module to run first after '--' "
                         "(python -m adpm_dist.launch module -- pkg.mod ARGS)")
    return argv[0], list(argv[1:])


def check_stage_argv(stage: str, argv: list[str]) -> None:
    """The stage's own argument checks, run in the submitting process before anything starts.

    A stage module with ``check_argv(argv)`` (train, estimate, sample, evaluate) runs its parser
    there, and for train the config merge, reading only a --config file, never data or
    checkpoints: a typo is the stage's user error here (exit 2), not a job that fails on the
    cluster. ``module`` runs an arbitrary module, whose arguments cannot be checked; selftest (a
    probe of the allocation, seconds long) has no check and reports its errors from the job.
    """
    if stage == MODULE_STAGE:
        return
    check = getattr(importlib.import_module(STAGES[stage]), "check_argv", None)
    if check is not None:
        check(list(argv))


def start_lines(stage: str, info: dist.DistInfo, threads: tuple[int, str]) -> str:
    """What every rank says first in its log: who and where it is, and its thread limit."""
    sched = dist.scheduler_info()
    node = sched["node_name"] or socket.gethostname()
    return (f"[launch] {stage} rank {info.rank}/{info.world_size} on {node} (master "
            f"{info.master_addr}:{info.master_port}), pid {os.getpid()}\n{describe(*threads)}")


def local_worker(argv: list[str]) -> int:
    """``python -m adpm_dist.launch _worker STAGE -- ARGS``: one local rank.

    The launcher exported this rank's variables and OMP_NUM_THREADS (its thread limit).
    """
    stage, rest = argv[0], argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    threads = int(os.environ["OMP_NUM_THREADS"])
    apply_threads(threads)
    print(start_lines(stage, dist.env_info(), (threads, "the launcher")), flush=True)
    return run_stage(stage, rest)


def run_stage(stage: str, argv: list[str]) -> int:
    """Import the stage's module and run its main(argv) in this process; its exit status."""
    name, argv = stage_module(stage, argv)
    module = importlib.import_module(name)
    try:
        rc = module.main(list(argv))
    except _Requeued:
        raise
    except SystemExit as exc:  # argparse errors and --help exit instead of returning
        code = exc.code
        rc = code if isinstance(code, int) else (0 if code is None else 1)
    return 0 if rc is None else int(rc)


def slurm_job_view(job_id: str, timeout_s: float = 30.0) -> tuple[str | None, str, int]:
    """(state, reason, restart count) from squeue; (None, "", 0) when the job is not listed.

    The restart count is SLURM's own: a requeue can pass between two polls of a
    follower (RUNNING → PENDING → RUNNING in under a second), so counting state
    changes would miss it.
    """
    try:
        out = subprocess.run(["squeue", "--states=all", "-h", "-O", "State:|,Reason:|,RestartCnt:|",
                              "-j", str(job_id)], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None, "", 0
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return None, "", 0
    state, reason, restarts = (lines[0].split("|") + ["", "", ""])[:3]
    return state.strip(), reason.strip(), int(restarts) if restarts.strip().isdigit() else 0


# What rank 0 did about a requeue request, recorded next to the job's logs (see
# requeue_record): "requeued" (scontrol requeue done), "left" (the job was no longer
# RUNNING: scancel or a time limit; the stage's checkpoint stays for a rerun) or
# "refused" (--max-requeues reached: the task fails).
REQUEUE_ACTIONS = ("requeued", "left", "refused")
PEER_WAIT_S = 60.0  # how long other ranks wait for rank 0's record before leaving anyway


def requeue_record_path(folder: str | Path, job_id: str) -> Path:
    return Path(folder) / f"{job_id}_requeue.json"


def write_requeue_record(folder: str | Path, job_id: str, restart: int, action: str,
                         why: str) -> None:
    """Atomically (temp + rename) record what rank 0 did; the follower and peers read it."""
    path = requeue_record_path(folder, job_id)
    record = {"job_id": str(job_id), "restart": int(restart), "action": action, "why": why}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def read_requeue_record(folder: str | Path, job_id: str) -> dict | None:
    """The record rank 0 left for ``job_id``, or None (none, or unreadable)."""
    try:
        record = json.loads(requeue_record_path(folder, job_id).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("action") in REQUEUE_ACTIONS
    return record if ok else None


def _job_folder() -> Path:
    return Path(submitit.JobEnvironment().paths.folder)


def _wait_for_rank0(job_id: str, restart: int, timeout_s: float = PEER_WAIT_S) -> None:
    """Return once rank 0 recorded its decision for this run of the job (or after timeout_s).

    Leaving first with a non-zero status would make srun kill rank 0 before it has
    requeued; waiting any longer than rank 0 needs only delays the requeue.
    """
    folder = _job_folder()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = read_requeue_record(folder, job_id)
        if record is not None and record["restart"] == restart:
            return
        time.sleep(0.2)


def _requeue_this_job(info: dist.DistInfo, max_requeues: int, why: str) -> NoReturn:
    """Rank 0 requeues the running job; every rank then leaves without a result record."""
    sched = dist.scheduler_info()
    job_id, restarts = sched["job_id"], sched["restart_count"] or 0
    if info.rank != 0:
        _wait_for_rank0(job_id, restarts)
        raise _Requeued()
    folder = _job_folder()
    state = slurm_job_view(job_id)[0]
    if state != "RUNNING":
        # scancel, a time limit, or SLURM's own preemption requeue: not ours to undo.
        write_requeue_record(folder, job_id, restarts, "left", why)
        print(f"[launch] {why}; job {job_id} is {state}: not requeueing (the stage's "
              "checkpoint stays for a rerun)", flush=True)
        raise _Requeued()
    if restarts >= max_requeues:
        write_requeue_record(folder, job_id, restarts, "refused", why)
        raise StageFailed(f"{why}, but job {job_id} was already requeued {restarts} times "
                          f"(--max-requeues {max_requeues}); rerun to resume")
    subprocess.run(["scontrol", "requeue", str(job_id)], check=True, timeout=60)
    write_requeue_record(folder, job_id, restarts, "requeued", why)
    print(f"[launch] {why}: requeued job {job_id} (restart {restarts + 1})", flush=True)
    raise _Requeued()


class StageTask(submitit.helpers.Checkpointable):
    """What each SLURM task runs: the stage's main(argv) with torch.distributed variables set.

    A Checkpointable, so submitit's own preemption hook (SIGUSR2) resubmits the
    same stage and argv; the stage resumes from its last checkpoint.
    """

    def __init__(self, stage: str, argv: list[str], max_requeues: int = 10,
                 threads: tuple[int, str] | None = None) -> None:
        self.stage = stage
        self.argv = list(argv)
        self.max_requeues = max_requeues
        self.threads = threads  # the user's choice; None: from what SLURM allocated

    def __call__(self) -> dict:
        info = dist.env_info()
        dist.export_env(info)
        threads = self.threads or slurm_threads(os.environ, info.local_world_size)
        apply_threads(threads[0])
        # On stderr, which is also where srun reports tasks' ends: the follower reads only
        # what srun wrote after rank 0's latest start (an earlier run's report is stale).
        print(start_lines(self.stage, info, threads), file=sys.stderr, flush=True)

        def on_signal(signum: int, frame: object) -> None:
            # Reached only when the stage installed no handler of its own: it cannot
            # checkpoint on request, so requeue now and let the rerun resume it.
            _requeue_this_job(info, self.max_requeues,
                              f"{signal.Signals(signum).name} with no handler in the stage")

        previous = signal.signal(PREEMPT_SIGNAL, on_signal)
        try:
            rc = run_stage(self.stage, self.argv)
        finally:
            signal.signal(PREEMPT_SIGNAL, previous)
        if rc == REQUEUE_EXIT_CODE:
            _requeue_this_job(info, self.max_requeues, f"{self.stage} checkpointed for requeue")
        if rc != 0:
            # Leave with the stage's status, as a local rank does: srun reports it ("Exited
            # with exit code 2") and the follower reads it from there; the stage's error
            # line is already in this task's log.
            print(f"[launch] {self.stage} exited with status {rc} on rank {info.rank}",
                  file=sys.stderr, flush=True)
            raise SystemExit(rc)
        sched = dist.scheduler_info()
        return {"rank": info.rank, "world_size": info.world_size, "node": sched["node_name"],
                "restart_count": sched["restart_count"]}
