"""``make demo``: Analytic-DPM end to end on a problem with a known answer.

A 2-D Gaussian mixture has an exact noise predictor ε*, so everything the
toolkit does can be seen without training: Γ is estimated by Monte Carlo, then
the negative ELBO (bits/dim) is tabulated against the number of steps K for
ddpm-tilde, ddpm-beta and analytic-ddpm on the even and the optimal
trajectory — the shape of the paper's Table 1 — and a PNG shows Γ_t and σ² per
method. Everything lands in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from adpm_dist.diffusion.analytic import step_variances
from adpm_dist.diffusion.likelihood import negative_elbo
from adpm_dist.diffusion.moments import estimate_gamma
from adpm_dist.diffusion.samplers import make_generators
from adpm_dist.diffusion.trajectory import make_trajectory
from adpm_dist.errors import UsageError, UserArgumentParser, run_cli
from adpm_dist.models.oracle import two_cluster_mixture

ROWS = (("ddpm-tilde", "even"), ("ddpm-beta", "even"), ("analytic-ddpm", "even"),
        ("analytic-ddpm", "optimal"))


def build_parser() -> argparse.ArgumentParser:
    p = UserArgumentParser(prog="adpm_dist.stages.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    p.add_argument("--num-timesteps", type=int, default=1000)
    p.add_argument("--gamma-samples", type=int, default=2000, help="x₀ draws per timestep for Γ")
    p.add_argument("--eval-samples", type=int, default=1000, help="test points for the NLL")
    p.add_argument("--steps", default="10,25,50,100,200,1000")
    p.add_argument("--seed", type=int, default=0)
    return p


def nll_table(oracle, gamma, x0, ks, progress) -> dict:
    sched = oracle.schedule
    table: dict[str, dict[int, tuple[float, float]]] = {}
    for method, traj in ROWS:
        row = table.setdefault(f"{method} ({traj})", {})
        for k in ks:
            tau = make_trajectory(traj, sched, k, gamma=gamma)
            bpd = negative_elbo(oracle, sched, tau, method, x0, make_generators(range(len(x0))),
                                gamma=gamma)["bpd"].numpy()
            row[k] = (float(bpd.mean()), float(bpd.std(ddof=1) / np.sqrt(len(bpd))))
            progress()
    return table


def markdown(table: dict, ks) -> str:
    head = "| method | " + " | ".join(f"K={k}" for k in ks) + " |"
    lines = [head, "|" + "---|" * (len(ks) + 1)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in ks) + " |")
    return "\n".join(lines)


def plot(oracle, gamma, stderr, k, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sched = oracle.schedule
    n = np.arange(1, sched.num_timesteps + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(n, gamma[1:], lw=1, label="Γ_t (Monte Carlo)")
    ax1.fill_between(n, gamma[1:] - 2 * stderr[1:], gamma[1:] + 2 * stderr[1:], alpha=0.3, label="±2 s.e.")
    ax1.set_xlabel("t")
    ax1.set_ylabel("Γ_t = E‖ε‖²/d")
    ax1.legend()
    tau = make_trajectory("even", sched, k)
    for method in ("ddpm-beta", "ddpm-tilde", "analytic-ddpm"):
        v = step_variances(sched, tau, method, gamma=gamma)
        ax2.semilogy(v.t, v.sigma2, marker="o", ms=3, label=method)
    ax2.set_xlabel("t (step t → s, even trajectory)")
    ax2.set_ylabel("σ²")
    ax2.set_title(f"reverse variances, K={k}")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Bad flags → one ``error:`` line and exit 2; anything else keeps its traceback."""
    return run_cli(_main, sys.argv[1:] if argv is None else argv)


def _main(argv: list[str] | None) -> int:
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.progress import Progress

    args = build_parser().parse_args(argv)
    ks = [int(k) for k in args.steps.split(",")]
    bad = [k for k in ks if not 2 <= k <= args.num_timesteps]
    if bad:
        raise UsageError(f"--steps {bad} outside 2..{args.num_timesteps}")
    os.makedirs(args.out, exist_ok=True)
    console = Console()
    start = time.time()
    oracle = two_cluster_mixture(2, {"name": args.schedule, "num_timesteps": args.num_timesteps})
    gen = torch.Generator().manual_seed(args.seed)
    with Progress(console=console) as bar:
        task = bar.add_task("Γ by Monte Carlo", total=1)
        data = oracle.sample_data(args.gamma_samples, gen)
        gamma, stderr = estimate_gamma(oracle, oracle.schedule, data, gen)
        bar.advance(task)
        x0 = oracle.sample_data(args.eval_samples, gen)
        task = bar.add_task("NLL table", total=len(ROWS) * len(ks))
        table = nll_table(oracle, gamma, x0, ks, lambda: bar.advance(task))
    md = markdown(table, ks)
    console.print(Markdown("### Negative ELBO (bits/dim), 2-D mixture, exact ε*\n\n" + md))
    plot(oracle, gamma, stderr, min(ks), os.path.join(args.out, "gamma_sigma2.png"))
    with open(os.path.join(args.out, "nll.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "nll.json"), "w") as f:
        json.dump({name: {str(k): v for k, v in row.items()} for name, row in table.items()}, f, indent=1)
    console.print(f"wrote {args.out}/nll.md, nll.json, gamma_sigma2.png in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
