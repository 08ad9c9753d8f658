"""What every rank of a launched job runs: a stage's ``main(argv)``, and the requeue on preemption.

:class:`StageTask` is what submitit pickles into the SLURM job (by reference, so
it lives in this importable module); local ranks call :func:`run_stage` directly.
A stage that checkpoints on ``PREEMPT_SIGNAL`` returns ``REQUEUE_EXIT_CODE``;
rank 0 then ``scontrol requeue``s the job and every rank leaves without a result
record, so the launcher keeps following the same job id.
"""

from __future__ import annotations

import importlib
import signal
import socket
import subprocess
import time
from typing import NoReturn

import submitit

from adpm_dist.io import dist
from adpm_dist.io.preempt import REQUEUE_EXIT_CODE

# Stages that run on the allocation; each module has main(argv) -> int.
STAGES = {
    "train": "adpm_dist.train.loop",
    "estimate": "adpm_dist.stages.estimate",
    "sample": "adpm_dist.stages.sample",
    "evaluate": "adpm_dist.stages.evaluate",
    "selftest": "adpm_dist.stages.selftest",
}
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


def run_stage(stage: str, argv: list[str]) -> int:
    """Import ``adpm_dist.<stage>`` and run its main(argv) in this process; its exit status."""
    module = importlib.import_module(STAGES[stage])
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


def _requeue_this_job(info: dist.DistInfo, max_requeues: int, why: str) -> NoReturn:
    """Rank 0 requeues the running job; every rank then leaves without a result record."""
    sched = dist.scheduler_info()
    job_id, restarts = sched["job_id"], sched["restart_count"] or 0
    if info.rank == 0:
        state = slurm_job_view(job_id)[0]
        if state != "RUNNING":
            # scancel, a time limit, or SLURM's own preemption requeue: not ours to undo.
            print(f"[launch] {why}; job {job_id} is {state}: not requeueing (the stage's "
                  "checkpoint stays for a rerun)", flush=True)
            raise _Requeued()
        if restarts >= max_requeues:
            raise StageFailed(f"{why}, but job {job_id} was already requeued {restarts} times "
                              f"(--max-requeues {max_requeues}); rerun to resume")
        subprocess.run(["scontrol", "requeue", str(job_id)], check=True, timeout=60)
        print(f"[launch] {why}: requeued job {job_id} (restart {restarts + 1})", flush=True)
        raise _Requeued()
    # Other ranks wait for the requeue to end them: leaving first with a non-zero status
    # would make srun kill rank 0 before it has requeued.
    time.sleep(60)
    raise _Requeued()


class StageTask(submitit.helpers.Checkpointable):
    """What each SLURM task runs: the stage's main(argv) with torch.distributed variables set.

    A Checkpointable, so submitit's own preemption hook (SIGUSR2) resubmits the
    same stage and argv; the stage resumes from its last checkpoint.
    """

    def __init__(self, stage: str, argv: list[str], max_requeues: int = 10) -> None:
        self.stage = stage
        self.argv = list(argv)
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        info = dist.env_info()
        dist.export_env(info)
        print(f"[launch] {self.stage} rank {info.rank}/{info.world_size} on "
              f"{dist.scheduler_info()['node_name'] or socket.gethostname()} "
              f"(master {info.master_addr}:{info.master_port})", flush=True)

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
            raise StageFailed(f"{self.stage} exited with status {rc} on rank {info.rank} "
                              f"({dist.scheduler_info()['node_name'] or socket.gethostname()})")
        sched = dist.scheduler_info()
        return {"rank": info.rank, "world_size": info.world_size, "node": sched["node_name"],
                "restart_count": sched["restart_count"]}
