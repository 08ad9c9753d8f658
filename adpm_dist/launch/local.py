"""A stage as N × G processes on this machine, with torchrun's variables; restarted on a requeue."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from adpm_dist.io import dist
from adpm_dist.io.preempt import REQUEUE_EXIT_CODE
from adpm_dist.launch.report import (
    RankEnd,
    describe_failure,
    first_failure,
    key_line,
    latest_progress,
    read_tail,
    stage_summary,
)
from adpm_dist.launch.status import EXIT_FAILED, EXIT_OK, LaunchError, Outcome, StatusView, last_line, tail
from adpm_dist.launch.task import PREEMPT_SIGNAL
from adpm_dist.launch.threads import THREAD_VARS

if TYPE_CHECKING:
    from adpm_dist.launch.spec import LaunchSpec


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(info: dist.DistInfo, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "SUBMITIT_"))}
    env.update(dist.env_vars(info))
    env.update(dict.fromkeys(THREAD_VARS, str(threads)))
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


def run_local(spec: LaunchSpec, folder: Path, threads: int = 1, poll_s: float = 0.2) -> Outcome:
    """N × G processes here with torchrun's variables and ``threads`` threads each; restart
    the group on a requeue."""
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
                        env=_child_env(info, threads), stdout=log, stderr=subprocess.STDOUT))
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
        view.update("running" if done < len(procs) else "finishing", detail, last_line(logs[0]),
                    latest_progress(logs[0]))
        if any(c not in (None, 0, REQUEUE_EXIT_CODE) for c in codes):
            return _failure(procs, logs)
        if done == len(procs):
            if all(c == 0 for c in codes):
                summary = stage_summary(logs[0])
                return Outcome(EXIT_OK, f"{spec.stage} finished on {len(procs)} local processes; "
                               f"logs in {logs[0].parent}" +
                               (f"\n[launch] {spec.stage}: {summary}" if summary else ""))
            return None  # some ranks asked for a requeue, the others finished: rerun
        if deadline is not None and time.monotonic() > deadline:
            _stop_all(procs)
            return Outcome(EXIT_FAILED, f"local run exceeded --wait-timeout {spec.wait_timeout}s")
        time.sleep(poll_s)


def _failure(procs: list[subprocess.Popen], logs: list[Path], grace_s: float = 3.0) -> Outcome:
    """Name the rank that failed first, and the peers that failed on their own after it.

    The peers get ``grace_s`` to fail by themselves (a lost connection shows up within
    milliseconds), so their errors are reported as consequences; then the rest are stopped.
    """
    seen: list[int] = []  # failed ranks in the order they were seen
    deadline = time.monotonic() + grace_s
    while True:
        codes = [p.poll() for p in procs]
        seen += [r for r, c in enumerate(codes)
                 if c not in (None, 0, REQUEUE_EXIT_CODE) and r not in seen]
        if all(c is not None for c in codes) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    _stop_all(procs)
    ends = [RankEnd(r, status=codes[r] if codes[r] > 0 else None,
                    signal=-codes[r] if codes[r] < 0 else None, why=key_line(read_tail(logs[r])))
            for r in seen]
    root = first_failure(ends).rank
    status, text = describe_failure(ends, "local rank",
                                    f"last lines of {logs[root]}:\n{tail(logs[root], 20)}")
    return Outcome(status, text)
