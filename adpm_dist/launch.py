"""Run any stage on N nodes × G GPUs: on SLURM through submitit, or as local processes.

    python -m adpm_dist.launch train --nodes 4 --gpus-per-node 8 --wait -- --config configs/cifar10.yaml
    python -m adpm_dist.launch selftest --nodes 2 --cluster local -- --out report.json
    python -m adpm_dist.launch plan ...          # adpm_dist.plan.main, on this machine

Everything after ``--`` (and any argument the launcher does not know) goes to the
stage's ``main(argv)`` unchanged.

**SLURM** (``--cluster slurm``, or ``auto`` when a controller answers): one
sbatch job with ``--nodes N``, one task per GPU (``--tasks-per-node T`` on CPU
clusters), submitted with submitit. Every task turns SLURM's variables into
torchrun's through ``dist`` and runs the stage's ``main(argv)`` in-process.
The launcher prints the job id and log paths; ``--wait`` follows the job and
exits with its status. A task that raises is reported with its traceback as
soon as its error record appears, and ``srun --kill-on-bad-exit`` ends the
other tasks instead of leaving them in a rendezvous.

**Requeue**: the job asks SLURM for SIGUSR1 ahead of its time limit. Stages
that handle it (``preempt``) checkpoint and return ``preempt.REQUEUE_EXIT_CODE``;
rank 0 then requeues the job (``scontrol requeue``: the same job id runs the
same argv again, and the stage resumes from its checkpoint). A stage without a
handler is requeued on the signal directly (stages are resumable by rerun), and
submitit's own checkpoint hook (SIGUSR2) resubmits the same argv too. The job
is requeued only while SLURM still lists it RUNNING: after ``scancel``, a time
limit, or a preemption SLURM requeues itself, the launcher leaves it alone.

**Local** (``--cluster local``, or ``auto`` without SLURM): N × G processes on
this machine with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
NODE_RANK, MASTER_ADDR=127.0.0.1, ...). A process that fails ends the others at
once; a run whose stage asked for a requeue is restarted with the same argv.

Exit status: 0 success (or submitted, without ``--wait``); 1 the job failed;
2 usage error, no SLURM reachable, or submission rejected (SLURM's reason is
shown); 75 (``REQUEUE_EXIT_CODE``) stopped after a checkpoint, rerun to resume.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import submitit
from rich.console import Console

from . import dist
from .preempt import REQUEUE_EXIT_CODE

# Stages that run on the allocation; each module has main(argv) -> int.
STAGES = {
    "train": "adpm_dist.train",
    "estimate": "adpm_dist.estimate",
    "sample": "adpm_dist.sample",
    "evaluate": "adpm_dist.evaluate",
    "selftest": "adpm_dist.selftest",
}
# Stages that only ever run here (no cluster), forwarded as they are.
LOCAL_ONLY = {"plan": "adpm_dist.plan"}

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
PREEMPT_SIGNAL = signal.SIGUSR1  # what the job asks SLURM to send before its time limit
# Job states in which the job may still run (or run again); everything else is final.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                 "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED",
                 "RESV_DEL_HOLD", "UNKNOWN"}
REPO_SLURM_BIN = Path(__file__).resolve().parents[1] / "slurm" / "bin"


class LaunchError(RuntimeError):
    """Launching could not start (no cluster, rejected submission, bad options)."""


class StageFailed(RuntimeError):
    """A stage returned a failure status on one rank."""


class _Requeued(SystemExit):
    """This task leaves because its job was (or will not be) requeued; no result record.

    A SystemExit passes through submitit's error handling (which catches Exception),
    so no result file is written and the launcher keeps following the same job id.
    """

    def __init__(self) -> None:
        super().__init__(REQUEUE_EXIT_CODE)


# ------------------------------------------------------------------ options


@dataclass
class LaunchSpec:
    """What to run where. ``stage_argv`` goes to the stage's main() untouched."""

    stage: str
    stage_argv: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 60
    cluster: str = "auto"
    wait: bool = False
    wait_timeout: float | None = None
    log_dir: str = "runs/launch"
    job_name: str | None = None
    max_requeues: int = 10

    @property
    def procs_per_node(self) -> int:
        """One process per GPU; on CPU, --tasks-per-node (default 1)."""
        if self.gpus_per_node > 0:
            return self.gpus_per_node
        return self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adpm_dist.launch",
        description="Run a stage on SLURM (submitit) or as local processes. Arguments after "
                    "'--' (and unknown ones) go to the stage.",
        allow_abbrev=False,
    )
    p.add_argument("stage", choices=sorted(STAGES) + sorted(LOCAL_ONLY))
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node, one process each (default 0: CPU)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node on CPU (default 1; with GPUs it equals --gpus-per-node)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per process (SLURM)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--qos", help="SLURM quality of service")
    p.add_argument("--time", dest="time_min", type=int, default=60,
                   help="time limit in minutes (default 60)")
    p.add_argument("--cluster", choices=("auto", "slurm", "local"), default="auto",
                   help="auto: SLURM when a controller answers, else local (default)")
    p.add_argument("--wait", action="store_true",
                   help="follow the SLURM job and exit with its status (local runs always wait)")
    p.add_argument("--wait-timeout", type=float, default=None,
                   help="give up following after this many seconds (the job keeps running)")
    p.add_argument("--log-dir", default="runs/launch", help="logs and job records (default "
                   "runs/launch; on SLURM it must be on a filesystem the nodes share)")
    p.add_argument("--job-name", help="SLURM job name (default adpm-<stage>)")
    p.add_argument("--max-requeues", type=int, default=10,
                   help="requeue at most this many times (default 10)")
    return p


def parse_args(argv: list[str]) -> LaunchSpec:
    """Parse launcher options; the stage's own arguments pass through untouched."""
    if "--" in argv:
        cut = argv.index("--")
        own, passthrough = argv[:cut], argv[cut + 1:]
    else:
        own, passthrough = argv, []
    parser = build_parser()
    ns, unknown = parser.parse_known_args(own)
    spec = LaunchSpec(stage=ns.stage, stage_argv=unknown + passthrough, nodes=ns.nodes,
                      gpus_per_node=ns.gpus_per_node, tasks_per_node=ns.tasks_per_node,
                      cpus_per_task=ns.cpus_per_task, partition=ns.partition,
                      account=ns.account, qos=ns.qos, time_min=ns.time_min, cluster=ns.cluster,
                      wait=ns.wait, wait_timeout=ns.wait_timeout, log_dir=ns.log_dir,
                      job_name=ns.job_name, max_requeues=ns.max_requeues)
    problems = []
    if spec.nodes < 1:
        problems.append("--nodes must be ≥ 1")
    if spec.gpus_per_node < 0:
        problems.append("--gpus-per-node must be ≥ 0")
    if spec.tasks_per_node is not None and spec.tasks_per_node < 1:
        problems.append("--tasks-per-node must be ≥ 1")
    if spec.gpus_per_node > 0 and spec.tasks_per_node not in (None, spec.gpus_per_node):
        problems.append(f"--tasks-per-node {spec.tasks_per_node} conflicts with --gpus-per-node "
                        f"{spec.gpus_per_node} (one process per GPU)")
    if spec.time_min < 1:
        problems.append("--time must be ≥ 1 minute")
    if problems:
        parser.error("; ".join(problems))
    return spec


# ------------------------------------------------------------------ running a stage


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


def _slurm_state(job_id: str, timeout_s: float = 30.0) -> str | None:
    """The job's state according to the controller (squeue), or None if it is not listed."""
    return _slurm_job_view(job_id, timeout_s)[0]


def _slurm_job_view(job_id: str, timeout_s: float = 30.0) -> tuple[str | None, str, int]:
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
        state = _slurm_state(job_id)
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


# ------------------------------------------------------------------ display


class StatusView:
    """One status line per change (logs, pipes) or a live panel on a terminal."""

    def __init__(self, title: str, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.title = title
        self.started = time.monotonic()
        self._last_plain = ""
        self._live = None
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.start()

    def update(self, state: str, detail: str = "", log_line: str = "") -> None:
        elapsed = time.monotonic() - self.started
        if self._live is not None:
            from rich.console import Group
            from rich.text import Text

            head = Text.assemble((self.title, "bold"), "  ", (state, "cyan"),
                                 f"  {elapsed:5.0f}s  {detail}")
            tail = Text(log_line, style="dim", no_wrap=True, overflow="ellipsis")
            self._live.update(Group(head, tail) if log_line else head)
            return
        plain = f"{self.title}: {state}" + (f" ({detail})" if detail else "")
        if plain != self._last_plain:
            self.console.print(f"[{elapsed:5.0f}s] {plain}", highlight=False)
            self._last_plain = plain

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()


def _last_line(path: Path, max_bytes: int = 4096) -> str:
    """The last non-empty line of a log (progress bars redraw with \\r)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    parts = [s.strip() for s in tail.replace("\r", "\n").split("\n") if s.strip()]
    return parts[-1] if parts else ""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------ SLURM


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
    if "accounting_storage/none" in out.stdout and (REPO_SLURM_BIN / "sacct").exists():
        path = os.environ.get("PATH", "")
        if not path.startswith(str(REPO_SLURM_BIN)):
            os.environ["PATH"] = f"{REPO_SLURM_BIN}{os.pathsep}{path}"


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


@dataclass
class Outcome:
    status: int
    message: str


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


def follow_slurm(job: submitit.Job, timeout_s: float | None = None,
                 poll_s: float = 2.0) -> Outcome:
    """Follow a job until it ends; a task's error is reported as soon as it is recorded."""
    view = StatusView(f"job {job.job_id}")
    rank0_log = job.task(0).paths.stdout
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    requeues = 0
    try:
        while True:
            state, reason, restarts = _slurm_job_view(job.job_id)
            # squeue forgets jobs after MinJobAge; then ask sacct through submitit.
            state = state or job.watcher.get_state(job.job_id, mode="force")
            requeues = max(requeues, restarts)  # sacct's fallback does not carry the count
            detail = f"{job.num_tasks} tasks" + (f", requeued {requeues}×" if requeues else "")
            # Why a job waits (Resources, Priority, PartitionNodeLimit, ...) is worth showing.
            shown = (f"{detail}, reason: {reason}" if state == "PENDING" and reason not in ("", "None")
                     else detail)
            view.update(state, shown, _last_line(rank0_log))
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
                status = REQUEUE_EXIT_CODE if "requeue" in _tail(rank0_log, 5) else EXIT_FAILED
                return Outcome(status, f"job {job.job_id} ended {state}; tasks {missing} left no "
                               f"result. Last lines of {err}:\n{_tail(err, 20)}")
            if deadline is not None and time.monotonic() > deadline:
                return Outcome(EXIT_FAILED, f"stopped following job {job.job_id} after "
                               f"{timeout_s:.0f}s; it is still {state} (scancel {job.job_id})")
            time.sleep(poll_s)
    finally:
        view.close()


# ------------------------------------------------------------------ local processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(info: dist.DistInfo) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "SUBMITIT_"))}
    env.update(dist.env_vars(info))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop_all(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM the live processes (a chance to checkpoint), SIGKILL after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)


def run_local(spec: LaunchSpec, folder: Path, poll_s: float = 0.2) -> Outcome:
    """N × G processes here with torchrun's variables; restart the group on a requeue."""
    if spec.gpus_per_node > 0:
        import torch

        have = torch.cuda.device_count()
        if have < spec.gpus_per_node:
            raise LaunchError(f"--cluster local with --gpus-per-node {spec.gpus_per_node}, but "
                              f"this machine has {have} GPU(s)")
    folder.mkdir(parents=True, exist_ok=True)
    per_node = spec.procs_per_node
    logs = [folder / f"rank{r}.log" for r in range(spec.world_size)]
    stopping: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopping.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    procs: list[subprocess.Popen] = []
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, PREEMPT_SIGNAL)}
    view = StatusView(f"local {spec.stage} ×{spec.world_size}")
    deadline = None if spec.wait_timeout is None else time.monotonic() + spec.wait_timeout
    try:
        for attempt in range(spec.max_requeues + 1):
            port = _free_port()
            procs = []
            for r in range(spec.world_size):
                info = dist.DistInfo(rank=r, world_size=spec.world_size, local_rank=r % per_node,
                                     local_world_size=per_node, node_rank=r // per_node,
                                     master_addr="127.0.0.1", master_port=port,
                                     source="torchrun")
                with open(logs[r], "ab") as log:
                    log.write(f"[launch] attempt {attempt} rank {r}\n".encode())
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "adpm_dist.launch", "_worker", spec.stage, "--",
                         *spec.stage_argv],
                        env=_child_env(info), stdout=log, stderr=subprocess.STDOUT))
            outcome = _watch_local(spec, procs, logs, view, attempt, deadline, poll_s)
            if outcome is not None:
                return outcome
            if stopping:
                return Outcome(REQUEUE_EXIT_CODE, f"stopped by {signal.Signals(stopping[0]).name}"
                               " after a checkpoint; rerun the same command to resume")
        return Outcome(EXIT_FAILED, f"requeued {spec.max_requeues} times (--max-requeues); "
                       "rerun to resume")
    finally:
        _stop_all(procs)
        for s, h in previous.items():
            signal.signal(s, h)
        view.close()


def _watch_local(spec: LaunchSpec, procs: list[subprocess.Popen], logs: list[Path],
                 view: StatusView, attempt: int, deadline: float | None,
                 poll_s: float) -> Outcome | None:
    """Wait for one attempt; None means every rank asked for a requeue."""
    while True:
        codes = [p.poll() for p in procs]
        done = sum(c is not None for c in codes)
        detail = f"{done}/{len(procs)} exited" + (f", attempt {attempt + 1}" if attempt else "")
        view.update("running" if done < len(procs) else "finishing", detail, _last_line(logs[0]))
        bad = [r for r, c in enumerate(codes) if c not in (None, 0, REQUEUE_EXIT_CODE)]
        if bad:
            r = bad[0]
            _stop_all(procs)
            return Outcome(EXIT_FAILED, f"local rank {r} exited with status {codes[r]}; last "
                           f"lines of {logs[r]}:\n{_tail(logs[r], 20)}")
        if done == len(procs):
            if all(c == 0 for c in codes):
                return Outcome(EXIT_OK, f"{spec.stage} finished on {len(procs)} local processes; "
                               f"logs in {logs[0].parent}")
            return None  # some ranks asked for a requeue, the others finished: rerun
        if deadline is not None and time.monotonic() > deadline:
            _stop_all(procs)
            return Outcome(EXIT_FAILED, f"local run exceeded --wait-timeout {spec.wait_timeout}s")
        time.sleep(poll_s)


# ------------------------------------------------------------------ entry points


def _run_folder(spec: LaunchSpec) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(spec.log_dir).absolute() / f"{spec.stage}-{stamp}-{uuid.uuid4().hex[:6]}"


def launch(spec: LaunchSpec, out: Callable[[str], None] = print) -> int:
    """Run or submit ``spec``; returns the launcher's exit status."""
    cluster = spec.cluster
    if cluster == "auto":
        ok, reason = slurm_reachable()
        cluster = "slurm" if ok else "local"
        if not ok:
            out(f"[launch] no SLURM reachable ({reason}); running on this machine")
    if importlib.util.find_spec(STAGES[spec.stage]) is None:
        raise LaunchError(f"stage '{spec.stage}' is not available: no module {STAGES[spec.stage]}")
    folder = _run_folder(spec)
    if cluster == "local":
        out(f"[launch] {spec.stage}: {spec.world_size} local processes "
            f"({spec.nodes} node(s) × {spec.procs_per_node}); logs: {folder}/rank*.log")
        outcome = run_local(spec, folder)
    else:
        job = submit_slurm(spec, folder)
        out(f"[launch] submitted {spec.stage} as SLURM job {job.job_id}: {spec.nodes} node(s) × "
            f"{spec.procs_per_node} task(s)")
        out(f"[launch] logs: {job.task(0).paths.stdout} (rank 0), "
            f"{folder}/{job.job_id}_<rank>_log.out|err")
        if not spec.wait:
            out(f"[launch] follow with: squeue -j {job.job_id}; stop with: scancel {job.job_id}")
            return EXIT_OK
        try:
            outcome = follow_slurm(job, spec.wait_timeout)
        except KeyboardInterrupt:
            out(f"[launch] stopped following; job {job.job_id} keeps running "
                f"(scancel {job.job_id})")
            return EXIT_FAILED
    out(f"[launch] {outcome.message}")
    return outcome.status


def _worker_main(argv: list[str]) -> int:
    """``python -m adpm_dist.launch _worker STAGE -- ARGS``: one local process."""
    stage, rest = argv[0], argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return run_stage(stage, rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        return _worker_main(argv[1:])
    if argv[:1] and argv[0] in LOCAL_ONLY:
        # Imported only when asked for: the module may not exist in every checkout.
        module = importlib.import_module(LOCAL_ONLY[argv[0]])
        rc = module.main(argv[1:])
        return 0 if rc is None else int(rc)
    spec = parse_args(argv)
    try:
        return launch(spec)
    except LaunchError as exc:
        print(f"[launch] error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    # Run the imported module, not __main__: submitit then pickles StageTask by reference.
    from adpm_dist import launch as _launch

    sys.exit(_launch.main())
