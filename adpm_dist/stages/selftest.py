"""Check an allocation before a big job: every rank joins torch.distributed and sums.

    python -m adpm_dist.launch selftest --nodes 2 --gpus-per-node 4 -- --out report.json
    python -m adpm_dist.stages.selftest                      # one process, no cluster

Each rank sets up the process group through ``dist`` (NCCL on GPU, gloo on CPU),
all-reduces ``rank + 1`` in float64 and checks that the sum is W(W+1)/2, then
rank 0 gathers who everyone is (rank, local rank, node, host, SLURM node name,
pid, device) and prints a JSON report (written atomically to ``--out`` when
given, local path or ``s3://``). Exit status 0 when every check passed, 1 when
one failed.

Flags for exercising a launcher (its tests use them):

- ``--crash-rank R``: rank R raises before joining the process group, so the
  other ranks sit in the rendezvous: the hang a launcher must turn into an error.
- ``--preempt-once MARKER``: the first run (MARKER absent) writes MARKER and
  returns ``preempt.REQUEUE_EXIT_CODE`` as a preempted stage does; the rerun
  (MARKER present) completes. With ``--hold S`` the first run first waits up
  to S seconds for a real preemption signal (SIGUSR1/SIGTERM); MARKER records
  whether a signal or the timer ended the wait.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch

from adpm_dist.errors import UserArgumentParser, run_cli
from adpm_dist.io import dist, preempt, storage


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = UserArgumentParser(
        prog="python -m adpm_dist.stages.selftest",
        description="torch.distributed self-test: all-reduce check and a JSON report.",
    )
    p.add_argument("--out", help="write the JSON report here (rank 0; local path or s3://)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds for process-group set-up and each collective (default 120)")
    p.add_argument("--crash-rank", type=int, default=None,
                   help="this rank raises before joining the group (launcher tests)")
    p.add_argument("--preempt-once", metavar="MARKER", default=None,
                   help="first run writes MARKER and exits 'requeue me'; the rerun completes")
    p.add_argument("--hold", type=float, default=0.0,
                   help="with --preempt-once: first wait up to this many seconds for a signal")
    return p.parse_args(argv)


def _who(info: dist.DistInfo, device: torch.device) -> dict:
    sched = dist.scheduler_info()
    return {
        "rank": info.rank,
        "local_rank": info.local_rank,
        "node_rank": info.node_rank,
        "host": socket.gethostname(),
        "slurm_node": sched["node_name"],
        "slurm_job_id": sched["job_id"],
        "restart_count": sched["restart_count"],
        "pid": os.getpid(),
        "device": str(device),
    }


def _any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank (one small all-reduce)."""
    box = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    return bool(dist.all_reduce_sum(box).item() > 0)


def _hold_for_signal(seconds: float, is_main: bool) -> str:
    """Wait up to ``seconds`` for a preemption signal on any rank; say what ended the wait."""
    deadline = time.monotonic() + seconds
    with preempt.PreemptionHandler():
        if is_main:  # only once the handler is in place: a signal sent on this line is caught
            print(f"selftest: holding up to {seconds:.0f}s for a preemption signal", flush=True)
        while True:
            # Ranks agree every 0.2 s, so all leave the loop together.
            if _any_rank(preempt.requested()):
                return "signal " + (",".join(preempt.received()) or "on another rank")
            if _any_rank(time.monotonic() >= deadline):
                return "timer"
            time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    info = dist.env_info()
    if args.crash_rank is not None and info.rank == args.crash_rank:
        raise RuntimeError(f"selftest: rank {info.rank} crashes on purpose (--crash-rank)")
    started = time.perf_counter()
    info = dist.init(timeout_s=args.timeout)
    joined_s = time.perf_counter() - started
    device = dist.device_for(info)
    backend = torch.distributed.get_backend() if dist.is_initialized() else "none"

    # The check: Σ_r (r + 1) = W(W + 1)/2, exact in float64.
    value = torch.tensor([float(info.rank + 1)], dtype=torch.float64)
    total = dist.all_reduce_sum(value).item()
    expected = info.world_size * (info.world_size + 1) / 2
    ranks = dist.all_gather_object(_who(info, device))

    if args.preempt_once is not None:
        first_run = not dist.broadcast_object(storage.exists(args.preempt_once))
        if first_run:
            reason = _hold_for_signal(args.hold, info.is_main) if args.hold > 0 else "simulated"
            if info.is_main:
                storage.write_text(args.preempt_once, json.dumps({
                    "preempted_by": reason, "slurm_job_id": ranks[0]["slurm_job_id"],
                    "restart_count": ranks[0]["restart_count"], "time": time.time(),
                }) + "\n")
                print(f"selftest: preempted ({reason}); exit {preempt.REQUEUE_EXIT_CODE} to "
                      "requeue", flush=True)
            dist.shutdown()
            return preempt.REQUEUE_EXIT_CODE

    ok = total == expected and len(ranks) == info.world_size
    report = {
        "ok": ok,
        "world_size": info.world_size,
        "backend": backend,
        "source": info.source,
        "master": f"{info.master_addr}:{info.master_port}",
        "allreduce_sum": total,
        "allreduce_expected": expected,
        "nodes": sorted({r["slurm_node"] or r["host"] for r in ranks}),
        "join_seconds": round(joined_s, 3),
        "ranks": ranks,
    }
    if args.preempt_once is not None and info.is_main:
        report["preempted_before"] = json.loads(storage.read_text(args.preempt_once))
    dist.shutdown()
    if info.is_main:
        text = json.dumps(report, indent=2)
        if args.out:
            storage.write_text(args.out, text + "\n")
        print(text, flush=True)
        if not ok:
            print(f"selftest: FAILED: all-reduce gave {total}, expected {expected}",
                  file=sys.stderr, flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Bad flags → one ``error:`` line and exit 2; a crash keeps its traceback (exit 1)."""
    return run_cli(lambda a: run(parse_args(a)), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
