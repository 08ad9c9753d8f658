#!/usr/bin/env python
"""The same short Γ job through torchrun and through ``python -m adpm_dist.launch`` (local, R ranks).

Prints one JSON object: evaluations/s of each (the job's own count ÷ its wall time, medians
over ``--repeats``, runs alternated because the machine is shared) and ``ratio`` =
launcher ÷ torchrun (goal ≈ 1). ``launcher_all_cores`` runs the launcher with every rank
allowed all cores (``--threads-per-rank`` = cores, what the launcher did before it set
threads per rank), to show what the limit is worth on this machine.

    python tools/bench_launch.py [--ranks 2] [--model tiny] [--timesteps 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))


def job_args(args, out: str) -> list[str]:
    return ["--checkpoint", args.ckpt, "--data", args.data, "--out", out, "--timesteps",
            f"1-{args.timesteps}", "--batch-size", str(args.batch_size), "--num-workers", "0",
            "--no-progress"]


def run(cmd: list[str], out: str) -> float:
    """Run one job (no OMP_NUM_THREADS from this shell: each launcher picks its own)."""
    from adpm_dist.gamma import read_gamma

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = ROOT
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    return float(read_gamma(out, require_complete=False).extra["evaluations_per_s"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="processes (default 2)")
    p.add_argument("--model", default="tiny", help="model preset (default tiny; mnist: 1.6M params)")
    p.add_argument("--timesteps", type=int, default=64, help="timesteps 1..T to estimate (default 64)")
    p.add_argument("--num-timesteps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=160, help="digits used (half are the test split)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-all-cores", action="store_true",
                   help="leave out launcher_all_cores (slow where ranks oversubscribe the cores)")
    args = p.parse_args(argv)
    from bench_estimate import make_inputs

    cores = len(os.sched_getaffinity(0))
    py = sys.executable
    with tempfile.TemporaryDirectory() as work:
        args.ckpt, args.data, _ = make_inputs(work, args.model, args.num_timesteps, args.samples)
        def launcher(out: str, *extra: str) -> list[str]:
            return [py, "-m", "adpm_dist.launch", "estimate", "--cluster", "local", "--tasks-per-node",
                    str(args.ranks), "--log-dir", os.path.join(work, "logs"), *extra, "--",
                    *job_args(args, out)]

        ways = {
            "torchrun": lambda out: [py, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", str(args.ranks), "-m",
                                     "adpm_dist.stages.estimate", *job_args(args, out)],
            "launcher": launcher,
            "launcher_all_cores": lambda out: launcher(out, "--threads-per-rank", str(cores)),
        }
        if args.skip_all_cores:
            del ways["launcher_all_cores"]
        runs: dict[str, list[float]] = {name: [] for name in ways}
        for i in range(args.repeats):
            for name, cmd in ways.items():
                out = os.path.join(work, f"{name}-{i}.json")
                runs[name].append(run(cmd(out), out))
    med = {name: float(np.median(v)) for name, v in runs.items()}
    all_cores = med.get("launcher_all_cores")
    print(json.dumps({
        "benchmark": "launch", "model": args.model, "ranks": args.ranks, "cores": cores,
        "timesteps": args.timesteps, "batch_size": args.batch_size, "repeats": args.repeats,
        "runs_evals_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "torchrun_evals_per_s": round(med["torchrun"], 1),
        "launcher_evals_per_s": round(med["launcher"], 1),
        "launcher_all_cores_evals_per_s": None if all_cores is None else round(all_cores, 1),
        "ratio": round(med["launcher"] / med["torchrun"], 3),
        "ratio_all_cores": None if all_cores is None else round(all_cores / med["torchrun"], 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
