"""Submitting a stage to SLURM through submitit, and following the job until it ends."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import submitit

from adpm_dist.io.preempt import REQUEUE_EXIT_CODE
from adpm_dist.launch.report import (
    RankEnd,
    describe_failure,
    first_failure,
    key_line,
    latest_progress,
    read_tail,
    stage_lines,
    stage_summary,
)
from adpm_dist.launch.status import EXIT_FAILED, EXIT_OK, LaunchError, Outcome, StatusView, last_line, tail
from adpm_dist.launch.task import StageTask, read_requeue_record, slurm_job_view

if TYPE_CHECKING:
    from adpm_dist.launch.spec import LaunchSpec

# Job states in which the job may still run (or run again); everything else is final.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                 "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED",
                 "RESV_DEL_HOLD", "UNKNOWN"}
# After a task failed, how long srun gets to end the step (and report every task) before scancel.
FAILURE_GRACE_S = 15.0
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


def submit_slurm(spec: LaunchSpec, folder: Path,
                 threads: tuple[int, str] | None = None) -> submitit.Job:
    """Submit ``spec`` (``threads``: the user's threads per rank; None: from SLURM's CPUs)."""
    ok, reason = slurm_reachable()
    if not ok:
        raise LaunchError(f"--cluster slurm: no SLURM reachable: {reason}. Start one with "
                          "'slurm/local-cluster.sh start', or run here with --cluster local.")
    _ensure_sacct()
    folder.mkdir(parents=True, exist_ok=True)
    ex = make_executor(spec, folder)
    task = StageTask(spec.stage, spec.stage_argv, spec.max_requeues, threads)
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


def follow_slurm(job: submitit.Job, timeout_s: float | None = None, poll_s: float = 2.0,
                 out: Callable[[str], None] = print) -> Outcome:
    """Follow a job until it ends, relaying rank 0's thread count and latest progress line;
    a task's failure is reported as soon as it is recorded or the job ends."""
    view = StatusView(f"job {job.job_id}")
    rank0 = job.task(0).paths
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    requeues, told_threads = 0, False
    try:
        while True:
            state, reason, restarts = slurm_job_view(job.job_id)
            # squeue forgets jobs after MinJobAge; then ask sacct through submitit.
            state = state or job.watcher.get_state(job.job_id, mode="force")
            requeues = max(requeues, restarts)  # sacct's fallback does not carry the count
            detail = f"{job.num_tasks} tasks" + (f", requeued {requeues}×" if requeues else "")
            if not told_threads and (line := _threads_line(rank0.stderr)):
                out(f"[launch] rank 0: {line}")
                told_threads = True
            # Why a job waits (Resources, Priority, PartitionNodeLimit, ...) is worth showing.
            shown = (f"{detail}, reason: {reason}" if state == "PENDING" and reason not in ("", "None")
                     else detail)
            view.update(state, shown, last_line(rank0.stdout), latest_progress(rank0.stdout))
            records = _task_records(job)
            if any(r[0] == "error" for r in records.values()) or state not in ACTIVE_STATES:
                return _job_ended(job, state, requeues, detail, poll_s)
            if len(records) == job.num_tasks:
                return _completed(job, detail)
            if deadline is not None and time.monotonic() > deadline:
                return Outcome(EXIT_FAILED, f"stopped following job {job.job_id} after "
                               f"{timeout_s:.0f}s; it is still {state} (scancel {job.job_id})")
            time.sleep(poll_s)
    finally:
        view.close()


def _threads_line(err_log: Path) -> str:
    lines = [ln for ln in read_tail(err_log).splitlines() if ln.startswith("threads per rank:")]
    return lines[-1] if lines else ""


def _completed(job: submitit.Job, detail: str) -> Outcome:
    summary = stage_summary(job.task(0).paths.stdout)
    return Outcome(EXIT_OK, f"job {job.job_id} completed ({detail})" +
                   (f"\n[launch] rank 0: {summary}" if summary else ""))


def _wait_until_ended(job_id: str, timeout_s: float, poll_s: float) -> str | None:
    """The job's state once it has left the active states, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    state = slurm_job_view(job_id)[0]
    while state in ACTIVE_STATES and time.monotonic() < deadline:
        time.sleep(poll_s)
        state = slurm_job_view(job_id)[0]
    return state


def _job_ended(job: submitit.Job, state: str | None, requeues: int, detail: str,
               poll_s: float) -> Outcome:
    """A task recorded an error, or the job ended: who failed first, and why."""
    if state in ACTIVE_STATES:
        # srun --kill-on-bad-exit ends the step within seconds, and only then has it
        # reported every task's end; a task stuck in its exit (or a rendezvous) is ended.
        state = _wait_until_ended(job.job_id, FAILURE_GRACE_S, min(poll_s, 1.0))
        if state in ACTIVE_STATES:
            subprocess.run(["scancel", str(job.job_id)], capture_output=True, timeout=60)
            state = _wait_until_ended(job.job_id, 30, 1.0) or state
    else:
        time.sleep(poll_s)  # result files may still be being written
    records = _task_records(job)
    errors = {t: str(r[1]) for t, r in records.items() if r[0] == "error"}
    if not errors and len(records) == job.num_tasks and state == "COMPLETED":
        return _completed(job, detail)
    ends = task_ends(job, errors)
    if not errors and _left_for_rerun(job, requeues):
        return Outcome(REQUEUE_EXIT_CODE, f"job {job.job_id} ended {state} after a checkpoint; "
                       "rerun the same command to resume")
    if ends:
        root = first_failure(ends)
        paths = job.task(root.rank).paths
        detail = _detail(errors.get(root.rank), paths.stderr)
        # The log of a stage that failed with one error line adds nothing to that line.
        detail = "" if detail.strip() in ("", root.why) else detail + "\n"
        status, text = describe_failure(ends, "task", f"{detail}logs: {paths.stderr}\n"
                                        f"      {paths.stdout}")
        return Outcome(status, f"job {job.job_id}: {text}")
    missing = [t for t in range(job.num_tasks) if t not in records]
    err = job.task(missing[0] if missing else 0).paths.stderr
    return Outcome(EXIT_FAILED, f"job {job.job_id} ended {state}; tasks {missing} left no "
                   f"result. Last lines of {err}:\n{tail(err, 20)}")


def _detail(trace: str | None, err_log: Path, lines: int = 12) -> str:
    """The end of a task's traceback (without the ^^^^ column markers), else of its log."""
    text = trace if trace is not None else "\n".join(stage_lines(read_tail(err_log)))
    kept = [ln for ln in text.strip().splitlines() if set(ln.strip()) - {"^", "~"}]
    return "  " + "\n  ".join(kept[-lines:])


def task_ends(job: submitit.Job, errors: dict[int, str]) -> list[RankEnd]:
    """The tasks that failed, in the order srun saw them end; then tasks with an error
    record srun has not reported. Tasks SLURM itself killed after the first failure, and
    tasks that left to be requeued, are not failures."""
    ends = []
    for task, status, signum, stopped in srun_verdicts(read_tail(job.task(0).paths.stderr)):
        if not (signum and stopped) and status != REQUEUE_EXIT_CODE and 0 <= task < job.num_tasks:
            ends.append(RankEnd(task, status, signum))
    seen = {e.rank for e in ends}
    ends += [RankEnd(t, status=1) for t in sorted(errors) if t not in seen]
    for end in ends:
        trace = errors.get(end.rank)
        end.why = key_line(trace) if trace is not None else key_line(
            read_tail(job.task(end.rank).paths.stderr))
    return ends


# srun's own account of tasks' ends, written to the batch script's stderr (task 0's .err):
#   srun: error: n2: task 1: Killed            srun: error: n1: tasks 0-1: Exited with exit code 2
SRUN_TASK = re.compile(r"^srun: error: [^:]+: tasks? ([\d,-]+): (.+?)(?: \(core dumped\))?$")
# ... and the lines that say srun (or scancel) is now ending the rest of the step.
SRUN_STOPS = ("Terminating StepId", "Force Terminated", "CANCELLED AT", "Job step aborted")
SIGNALS_BY_TEXT = {signal.strsignal(s): int(s) for s in signal.valid_signals() if signal.strsignal(s)}


def _task_ids(spec: str) -> list[int]:
    ids = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        ids += list(range(int(low), int(high or low) + 1))
    return ids


def srun_verdicts(err_text: str) -> list[tuple[int, int | None, int | None, bool]]:
    """(task, exit status, signal, after the step was being stopped) for every task srun
    reported, in its order; only srun's report after rank 0's latest start counts."""
    lines = err_text.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("[launch] ")]
    verdicts, stopped = [], False
    for line in lines[starts[-1] if starts else 0:]:
        stopped = stopped or any(word in line for word in SRUN_STOPS)
        match = SRUN_TASK.match(line.strip())
        if not match:
            continue
        what = match.group(2)
        code = re.fullmatch(r"Exited with exit code (\d+)", what)
        status, signum = (int(code.group(1)), None) if code else (None, SIGNALS_BY_TEXT.get(what))
        if status is None and signum is None:
            continue  # a message srun has that we do not know
        verdicts += [(t, status, signum, stopped) for t in _task_ids(match.group(1))]
    return verdicts
