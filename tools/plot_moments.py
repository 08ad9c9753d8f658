#!/usr/bin/env python
"""Plot the model's excess error per timestep: A_t against (β̄_t/ᾱ_t)(1 − Γ_t).

For the optimal ε* the two are equal (docs/architecture.md, "the model's own error"): the
second is the error Analytic-DPM assumes, the first the error the model makes. Where A_t lies
above, residual-ddpm's σ² exceeds analytic-ddpm's by γ²·(the gap); below (a model that
shrinks ε̂, so Γ_t is low and the assumed error high), it is smaller. Prints a JSON summary:
the two at a few t, and at how many t they differ by more than 2 standard errors either way.

    python tools/plot_moments.py G.json -o moments.png [--raw]
"""

from __future__ import annotations

import json
import sys

import numpy as np

from adpm_dist.diffusion.schedule import schedule_from_description
from adpm_dist.errors import UserArgumentParser, run_cli
from adpm_dist.gamma import read_gamma, require_moments


def curves(gamma_url: str, raw: bool) -> dict:
    """t, A_t and its s.e., and the perfect-model value (β̄_t/ᾱ_t)(1 − Γ_t) with its s.e."""
    gf = read_gamma(gamma_url, require_complete=False)
    moments = require_moments(gf, "tools/plot_moments.py", clip_x0=not raw)
    sched = schedule_from_description(gf.schedule, gamma_url)
    t = np.flatnonzero(gf.count > 0) + 1
    ratio = sched.bar_betas[t] / sched.alphas_cumprod[t]
    return {"t": t, "a": moments.a[t], "a_se": moments.a_stderr[t],
            "perfect": ratio * (1.0 - gf.gamma[t - 1]), "perfect_se": ratio * gf.stderr[t - 1]}


def summary(c: dict) -> dict:
    gap = c["a"] - c["perfect"]
    se = np.hypot(c["a_se"], c["perfect_se"])
    above, below = c["t"][gap > 2 * se], c["t"][gap < -2 * se]
    picks = [int(v) for v in np.unique(np.quantile(c["t"], [0, 0.1, 0.25, 0.5, 0.75, 1.0]).round())]
    at = {str(v): {"A": float(c["a"][c["t"] == v][0]), "perfect": float(c["perfect"][c["t"] == v][0])}
          for v in picks if v in set(c["t"].tolist())}
    return {"timesteps": int(c["t"].size), "A_above_by_2se": int(above.size),
            "A_below_by_2se": int(below.size), "first_t_above": int(above[0]) if above.size else None,
            "at": at}


def plot(c: dict, out: str, raw: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    label = "A_t = E‖x₀ − x̂₀‖²/d" + (" (raw x̂₀)" if raw else " (x̂₀ clamped)")
    ax.plot(c["t"], c["a"], label=label, color="C3")
    ax.fill_between(c["t"], c["a"] - 2 * c["a_se"], c["a"] + 2 * c["a_se"], color="C3", alpha=0.2)
    ax.plot(c["t"], c["perfect"], label="(β̄_t/ᾱ_t)(1 − Γ_t): what Analytic-DPM assumes", color="C0")
    ax.fill_between(c["t"], c["perfect"] - 2 * c["perfect_se"], c["perfect"] + 2 * c["perfect_se"],
                    color="C0", alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("t")
    ax.set_ylabel("per-dimension squared error of x̂₀")
    ax.set_title("The model's excess error per timestep (bands: ±2 s.e.)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    def run(args_argv) -> int:
        p = UserArgumentParser(prog="plot_moments.py", description=__doc__.split("\n\n")[0])
        p.add_argument("gamma", help="Γ file of format 2 (with the model-error moments)")
        p.add_argument("-o", "--out", required=True, help="PNG path")
        p.add_argument("--raw", action="store_true", help="A_t of the raw x̂₀ instead of the clamped one")
        args = p.parse_args(args_argv)
        c = curves(args.gamma, args.raw)
        plot(c, args.out, args.raw)
        print(json.dumps(summary(c)))
        return 0

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
