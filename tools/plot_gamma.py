#!/usr/bin/env python
"""Plot Γ_t with its ±2 s.e. band and, for K steps, σ² per method.

    python tools/plot_gamma.py G.json -o gamma.png [--steps K] [--trajectory even]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from adpm_dist.diffusion.analytic import step_variances
from adpm_dist.diffusion.schedule import schedule_from_description
from adpm_dist.diffusion.trajectory import make_trajectory
from adpm_dist.gamma import GammaFileError, read_gamma

METHODS = ("ddpm-beta", "ddpm-tilde", "analytic-ddpm", "ddim", "analytic-ddim")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gamma")
    p.add_argument("-o", "--out", required=True, help="PNG path")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--trajectory", default="even", choices=["even", "quadratic", "optimal"])
    args = p.parse_args(argv)
    try:
        gf = read_gamma(args.gamma)
        sched = schedule_from_description(gf.schedule, args.gamma)
        tau = make_trajectory(args.trajectory, sched, args.steps, gamma=gf.gamma_vector(),
                              gamma_stderr=gf.stderr)
    except (GammaFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.arange(1, gf.num_timesteps + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(n, gf.gamma, lw=1, label="Γ_t")
    ax1.fill_between(n, gf.gamma - 2 * gf.stderr, gf.gamma + 2 * gf.stderr, alpha=0.3, label="±2 s.e.")
    ax1.axhline(1.0, color="grey", lw=0.5, ls="--")
    ax1.set_xlabel("t")
    ax1.set_ylabel("Γ_t = E‖ε_θ‖²/d")
    ax1.set_title(f"{gf.model.get('name', '')} — {gf.schedule['name']}, N={gf.num_timesteps}")
    ax1.legend()
    for method in METHODS:
        v = step_variances(sched, tau, method, gamma=gf.gamma_vector(), gamma_stderr=gf.stderr)
        ax2.semilogy(v.t, v.sigma2, marker="o", ms=3, label=method)
    ax2.set_xlabel(f"t (step t → s, {args.trajectory} trajectory)")
    ax2.set_ylabel("σ²")
    ax2.set_title(f"K={args.steps}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
