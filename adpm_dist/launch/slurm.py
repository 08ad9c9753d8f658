"""Submitting a stage to SLURM through submitit, and following the job until it ends."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import submitit

from adpm_dist.io.preempt import REQUEUE_EXIT_CODE
from adpm_dist.launch.status import EXIT_FAILED, EXIT_OK, LaunchError, Outcome, StatusView, last_line, tail
from adpm_dist.launch.task import StageTask, read_requeue_record, slurm_job_view

if TYPE_CHECKING:
    from adpm_dist.launch.spec import LaunchSpec

# Job states in which the job may still run (or run again); everything else is final.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                 "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED",
                 "RESV_DEL_HOLD", "UNKNOWN"}
# Helper commands shipped as package data (adpm_dist/launch/bin), e.g. the sacct stand-in.
SLURM_BIN = Path(str(resources.files("adpm_dist.launch").joinpath("bin")))


def slurm_reachable(timeout_s: float = 20.0) -> tuple[bool, str]:
    """Whether a SLURM controller answers here; the reason when it does not."""
    for tool in ("sbatch", "srun", "scontrol", "squeue"):
        if shutil.which(tool) is None:
            return False, f"'{tool}' is not on PATH (no SLURM client installed here)"
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"'scontrol ping' did not answer within {timeout_s:.0f}s"
    # Keep SLURM's words, without the banner of asterisks it prints when the controller is down.
    text = " ".join(ln.strip() for ln in (out.stdout + out.stderr).splitlines()
                    if ln.strip() and not ln.strip().startswith("*"))
    if out.returncode != 0 or "UP" not in text:
        return False, f"the SLURM controller does not answer ('scontrol ping': {text or out.returncode})"
    return True, text


def _ensure_sacct() -> None:
    """submitit learns that a job ended from sacct; without accounting use our stand-in."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return
    if "accounting_storage/none" in out.stdout and (SLURM_BIN / "sacct").exists():
        path = os.environ.get("PATH", "")
        if not path.startswith(str(SLURM_BIN)):
            os.environ["PATH"] = f"{SLURM_BIN}{os.pathsep}{path}"


def _signal_delay_s(time_min: int) -> int:
    """Seconds before the time limit at which SLURM sends the checkpoint signal."""
    return max(10, min(120, time_min * 60 // 5))


def make_executor(spec: LaunchSpec, folder: Path) -> submitit.SlurmExecutor:
    ex = submitit.SlurmExecutor(folder=folder, python=shlex.quote(sys.executable))
    params: dict = {
        "job_name": spec.job_name or f"adpm-{spec.stage}",
        "nodes": spec.nodes,
        "ntasks_per_node": spec.procs_per_node,
        "time": spec.time_min,
        # One failing task ends the step instead of leaving the others in a rendezvous.
        "srun_args": ["--kill-on-bad-exit=1"],
        # SIGUSR1 (what stages' preemption handlers catch) instead of submitit's USR2,
        # and allow requeueing on clusters whose default is not to.
        "additional_parameters": {"signal": f"USR1@{_signal_delay_s(spec.time_min)}",
                                  "requeue": True},
    }
    if spec.gpus_per_node > 0:
        params["gpus_per_node"] = spec.gpus_per_node
    for key, value in (("cpus_per_task", spec.cpus_per_task), ("partition", spec.partition),
                       ("account", spec.account), ("qos", spec.qos)):
        if value is not None:
            params[key] = value
    ex.update_parameters(**params)
    return ex


def _sbatch_reason(exc: BaseException) -> str:
    """SLURM's own words from a failed sbatch, without submitit's wrapping."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if "sbatch:" in ln or "error" in ln.lower()]
    return "\n".join(dict.fromkeys(lines)) or text


def submit_slurm(spec: LaunchSpec, folder: Path) -> submitit.Job:
    ok, reason = slurm_reachable()
    if not ok:
        raise LaunchError(f"--cluster slurm: no SLURM reachable: {reason}. Start one with "
                          "'slurm/local-cluster.sh start', or run here with --cluster local.")
    _ensure_sacct()
    folder.mkdir(parents=True, exist_ok=True)
    ex = make_executor(spec, folder)
    task = StageTask(spec.stage, spec.stage_argv, spec.max_requeues)
    try:
        # No SLURM_*/RANK/MASTER_* from this shell may leak into the job's environment.
        with submitit.helpers.clean_env():
            return ex.submit(task)
    except Exception as exc:  # submitit wraps sbatch's refusal in several error types
        raise LaunchError(f"SLURM rejected the submission:\n{_sbatch_reason(exc)}") from exc


def _task_records(job: submitit.Job) -> dict[int, tuple[str, object]]:
    """Result records written so far, by task: ("success", value) or ("error", traceback)."""
    records = {}
    for t in range(job.num_tasks):
        path = job.task(t).paths.result_pickle
        if path.exists():
            try:
                records[t] = submitit.core.utils.pickle_load(path)
            except (EOFError, OSError):
                continue  # being written: read it on the next poll
    return records


def _error_message(job: submitit.Job, task: int, trace: object) -> str:
    paths = job.task(task).paths
    # The end of the traceback, without the ^^^^ markers that only point at columns.
    lines = [ln for ln in str(trace).strip().splitlines() if set(ln.strip()) - {"^", "~"}]
    return (f"job {job.job_id}: task {task} failed:\n  " + "\n  ".join(lines[-12:]) +
            f"\nlogs: {paths.stderr}\n      {paths.stdout}")


def _left_for_rerun(job: submitit.Job, requeues: int) -> bool:
    """True when rank 0 recorded that this run of the job checkpointed and left for a rerun.

    Decided from the record the task writes (launch.task.write_requeue_record), never
    from log text: a record of an earlier run (before a later requeue) does not count.
    """
    record = read_requeue_record(job.paths.folder, job.job_id)
    if record is None or record["action"] not in ("requeued", "left"):
        return False
    ran_after = record["restart"] + (1 if record["action"] == "requeued" else 0)
    return ran_after >= requeues


def follow_slurm(job: submitit.Job, timeout_s: float | None = None,
                 poll_s: float = 2.0) -> Outcome:
    """Follow a job until it ends; a task's error is reported as soon as it is recorded."""
    view = StatusView(f"job {job.job_id}")
    rank0_log = job.task(0).paths.stdout
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    requeues = 0
    try:
        while True:
            state, reason, restarts = slurm_job_view(job.job_id)
            # squeue forgets jobs after MinJobAge; then ask sacct through submitit.
            state = state or job.watcher.get_state(job.job_id, mode="force")
            requeues = max(requeues, restarts)  # sacct's fallback does not carry the count
            detail = f"{job.num_tasks} tasks" + (f", requeued {requeues}×" if requeues else "")
            # Why a job waits (Resources, Priority, PartitionNodeLimit, ...) is worth showing.
            shown = (f"{detail}, reason: {reason}" if state == "PENDING" and reason not in ("", "None")
                     else detail)
            view.update(state, shown, last_line(rank0_log))
            records = _task_records(job)
            errors = {t: r[1] for t, r in records.items() if r[0] == "error"}
            if errors:
                task = min(errors)
                if state in ACTIVE_STATES:
                    # The others may be stuck waiting for the failed task: end them now.
                    subprocess.run(["scancel", str(job.job_id)], capture_output=True, timeout=60)
                return Outcome(EXIT_FAILED, _error_message(job, task, errors[task]))
            if len(records) == job.num_tasks:
                return Outcome(EXIT_OK, f"job {job.job_id} completed ({detail})")
            if state not in ACTIVE_STATES:
                # Ended without every record: wait briefly for files still being written.
                time.sleep(poll_s)
                records = _task_records(job)
                errors = {t: r[1] for t, r in records.items() if r[0] == "error"}
                if errors:
                    return Outcome(EXIT_FAILED, _error_message(job, min(errors),
                                                               errors[min(errors)]))
                if len(records) == job.num_tasks and state == "COMPLETED":
                    return Outcome(EXIT_OK, f"job {job.job_id} completed ({detail})")
                missing = [t for t in range(job.num_tasks) if t not in records]
                err = job.task(missing[0]).paths.stderr
                status = REQUEUE_EXIT_CODE if _left_for_rerun(job, requeues) else EXIT_FAILED
                return Outcome(status, f"job {job.job_id} ended {state}; tasks {missing} left no "
                               f"result. Last lines of {err}:\n{tail(err, 20)}")
            if deadline is not None and time.monotonic() > deadline:
                return Outcome(EXIT_FAILED, f"stopped following job {job.job_id} after "
                               f"{timeout_s:.0f}s; it is still {state} (scancel {job.job_id})")
            time.sleep(poll_s)
    finally:
        view.close()
