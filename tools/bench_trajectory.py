#!/usr/bin/env python
"""Benchmark the optimal-trajectory dynamic programme; prints one JSON object.

- ``seconds``: wall time of ``optimal_trajectory`` (the J(s, t) cost matrix and the DP)
  for each K at N = ``--num-timesteps`` (goal: N = 1000, K = 100 in under 2 s on a
  2-core CPU); ``cost_matrix_seconds`` is the part shared by every K;
- ``speedup_vs_row_loop``: the DP alone written the way reference implementations do
  it, a Python loop over k and over t with NumPy only over s, ÷ ours
  (``least_cost_path``) on the same cost matrix. Alternating, median of ``--repeats``;
- ``same_cost``: both paths have the same total cost (to 1e-9 relative) — the speed-up
  is worthless if the answer differs.

Γ comes from ``--gamma G.json`` or, by default, the exact Γ_t = β̄_t / (ᾱ_t v + β̄_t)
of Gaussian data with per-pixel variance v = 0.25 (ε* is linear there), so the cost
landscape is a realistic one and needs no network.

    python tools/bench_trajectory.py [--num-timesteps 1000] [--steps 10,25,50,100] [--gamma G.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GOAL_SECONDS = 2.0  # N = 1000, K = 100


def row_loop_dp(cost: np.ndarray, n: int, num_steps: int) -> np.ndarray:
    """Baseline: D_k[t] = min_s D_{k−1}[s] + C[s, t], one NumPy min per (k, t)."""
    best = np.full(n + 1, np.inf)
    best[1] = 0.0
    back = np.zeros((num_steps, n + 1), dtype=np.int64)
    for k in range(1, num_steps):
        new = np.full(n + 1, np.inf)
        for t in range(2, n + 1):
            cand = best[1:t] + cost[1:t, t]
            j = int(np.argmin(cand))
            new[t], back[k, t] = cand[j], j + 1
        best = new
    tau = np.empty(num_steps, dtype=np.int64)
    tau[-1] = n
    for k in range(num_steps - 1, 0, -1):
        tau[k - 1] = back[k, tau[k]]
    return tau


def gaussian_gamma(schedule, variance: float) -> np.ndarray:
    abar, bbar = schedule.alphas_cumprod, schedule.bar_betas
    gamma = bbar / (abar * variance + bbar)
    gamma[0] = np.nan
    return gamma


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-timesteps", type=int, default=1000)
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    p.add_argument("--steps", default="10,25,50,100", help="comma-separated K values")
    p.add_argument("--gamma", default=None, help="a Γ file (its schedule wins over --schedule)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-baseline", action="store_true", help="time ours only")
    return p.parse_args(sys.argv[1:] if argv is None else argv)


def _schedule_and_gamma(args: argparse.Namespace):
    """(schedule, Γ, where Γ came from): a Γ file's, or Γ of Gaussian data in closed form."""
    from adpm_dist.diffusion.schedule import make_schedule, schedule_from_description

    if args.gamma:
        from adpm_dist.gamma import read_gamma

        gf = read_gamma(args.gamma)
        schedule = schedule_from_description(gf.schedule, args.gamma)
        return schedule, gf.gamma_vector(), args.gamma
    schedule = make_schedule(args.schedule, args.num_timesteps)
    return schedule, gaussian_gamma(schedule, 0.25), "exact Γ of N(0, 0.25·I) data"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from adpm_dist.diffusion.trajectory import (
        least_cost_path,
        optimal_trajectory,
        path_cost,
        step_cost_matrix,
    )

    schedule, gamma, source = _schedule_and_gamma(args)
    n = schedule.num_timesteps
    cost_s = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        cost = step_cost_matrix(schedule, gamma)
        cost_s.append(time.perf_counter() - t0)

    rows = []
    for k in (int(s) for s in args.steps.split(",")):
        total_s, dp_s, base_s = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tau = optimal_trajectory(schedule, gamma, k)
            total_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            least_cost_path(cost, k)
            dp_s.append(time.perf_counter() - t0)
            if not args.skip_baseline:
                t0 = time.perf_counter()
                ref = row_loop_dp(cost, n, k)
                base_s.append(time.perf_counter() - t0)
        row = {"K": k, "seconds": statistics.median(total_s), "dp_seconds": statistics.median(dp_s)}
        if base_s:
            ours_cost, ref_cost = path_cost(cost, tau), path_cost(cost, ref)
            row.update(
                baseline_dp_seconds=statistics.median(base_s),
                speedup_vs_row_loop=statistics.median(base_s) / row["dp_seconds"],
                same_cost=bool(abs(ours_cost - ref_cost) <= 1e-9 * max(1.0, abs(ref_cost))),
            )
        rows.append(row)
    headline = next((r for r in rows if r["K"] == 100), None)
    print(json.dumps({
        "num_timesteps": n,
        "schedule": schedule.name,
        "gamma": source,
        "repeats": args.repeats,
        "cost_matrix_seconds": statistics.median(cost_s),
        "results": rows,
        "goal": f"N = 1000, K = 100 in under {GOAL_SECONDS:g} s",
        "meets_goal": (headline["seconds"] < GOAL_SECONDS) if headline and n == 1000 else None,
    }, indent=1))
    return 0 if all(r.get("same_cost", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
