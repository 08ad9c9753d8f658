"""``plan``: print a trajectory and each step's σ² for a Γ file, without a network.

    python -m adpm_dist.launch plan --gamma G.json --steps K --method analytic-ddpm \
        --trajectory optimal [--eta 0] [--clip-pixel y] [--json] [--report DIR]

The schedule comes from the Γ file itself, so the plan is the one the sampler
will run with that file. For a DDPM-family method and a Γ file with the model-error
moments (format 2) it also prints the expected negative ELBO in bits/dim, with its
standard error, predicted from the file's statistics alone (diffusion/residual.py):
what ``evaluate nll`` would measure on the data the Γ job read. Statistics from the
training split describe other images: estimate them on the split you evaluate.
With the halves of a format-3 file the prediction is cross-fitted (chosen on one half,
scored on the other: honest where the in-sample one is biased low), and the model's
likelihood limit (K = N with the KL-optimal σ², and the continuous-time integral) and
the gap to it are reported (:mod:`adpm_dist.stages.plan_predict`). ``--report DIR``
writes one page (markdown and PNG plots) comparing every method and K.
"""

from __future__ import annotations

import json
import sys

from adpm_dist.diffusion.analytic import METHODS
from adpm_dist.diffusion.conventions import OURS, Conventions
from adpm_dist.diffusion.trajectory import TRAJECTORIES
from adpm_dist.errors import fraction, int_at_least, positive_float
from adpm_dist.gamma import load_for
from adpm_dist.stages.config_args import ConfigParser, add_config_options
from adpm_dist.stages.conventions import add_convention_flags, conventions_from
from adpm_dist.stages.job import main_wrapper
from adpm_dist.stages.plan_predict import choose, crossfit, gaps, limit, nll_variances, predicted

# The sampler's own flags and checks: the plan is the one `sample` would run.
from adpm_dist.stages.sample_args import CLIP_HELP, ETA_HELP, METHOD_HELP, TRAJECTORY_HELP, check_eta


def build_parser() -> ConfigParser:
    p = ConfigParser(prog="adpm_dist.launch plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--gamma", required=True, metavar="G.json",
                   help="Γ file (local path, file:// or s3://); the schedule is read from it")
    p.add_argument("--steps", type=int_at_least(2), required=True, metavar="K",
                   help="number of reverse steps K, 2 <= K <= N (the Γ file's timesteps)")
    p.add_argument("--method", default="analytic-ddpm", choices=METHODS,
                   help=METHOD_HELP + ". Default: %(default)s")
    p.add_argument("--trajectory", default="even", choices=TRAJECTORIES, help=TRAJECTORY_HELP)
    p.add_argument("--eta", type=fraction, default=0.0, help=ETA_HELP)
    p.add_argument("--clip-pixel", type=positive_float, default=None, metavar="Y", help=CLIP_HELP)
    p.add_argument("--json", action="store_true",
                   help='print {"trajectory": [τ_1..τ_K], "steps": [{s, t, sigma2}, …], "dp_cost", '
                        '"predicted_nelbo_bpd", "predicted_nelbo_crossfit_bpd", "limit", …} instead of a '
                        'table')
    p.add_argument("--report", metavar="DIR", default=None,
                   help="also write DIR/report.md and its PNG plots: Γ_t and its infeasible region, A_t "
                        "against Analytic-DPM's assumption, σ² per method, τ, predicted NELBO vs K with "
                        "the likelihood limit (local path, file:// or s3://)")
    add_convention_flags(p)
    add_config_options(p)
    return p


DP_COST_LABELS = {"paper": "the paper's J(s, t)",
                  "official": "the official code's _dp_seg (timeline cut where Γ > 1, J(s, t) before it)"}


def make_plan(gamma_url: str, steps: int, method: str, trajectory: str, eta=0.0, clip_pixel=None,
              conv: Conventions = OURS) -> dict:
    ref = load_for(None, gamma_url)  # partial files: checked per trajectory
    tau, var, topts = choose(ref, steps, method, trajectory, eta, clip_pixel, conv)
    plan = {"trajectory": [int(t) for t in tau], "steps": var.rows(), "conventions": conv.describe()}
    if trajectory == "optimal":
        cost = topts["cost"]
        plan["dp_cost"] = DP_COST_LABELS.get(cost) or f"expected NELBO of {topts['method']}"
    nll_var = nll_variances(ref, tau, method, eta, clip_pixel, conv)  # residual σ²: the NLL's --clip-x0
    plan.update(predicted(ref, nll_var, method, conv.nll_clip_x0))
    plan.update(crossfit(ref, steps, method, trajectory, eta, clip_pixel, conv))
    plan.update(limit(ref, conv.nll_clip_x0))
    plan.update(gaps(plan))
    return plan


def print_table(plan: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.method}, {args.trajectory} trajectory, K={args.steps}")
    table.add_column("step", justify="right")
    table.add_column("t → s", justify="right")
    table.add_column("σ²", justify="right")
    for i, row in enumerate(plan["steps"], start=1):
        table.add_row(str(i), f"{row['t']} → {row['s']}", f"{row['sigma2']:.6e}")
    console = Console()
    console.print(table)
    console.print(f"trajectory: {plan['trajectory']}")
    if "dp_cost" in plan:
        console.print(f"optimal trajectory by: {plan['dp_cost']}")
    print_predictions(console, plan)


def print_predictions(console, plan: dict) -> None:
    crossfitted = "predicted_nelbo_crossfit_bpd" in plan
    if crossfitted:
        bits, se = plan["predicted_nelbo_crossfit_bpd"], plan["predicted_nelbo_crossfit_stderr"]
        console.print(f"expected −ELBO: {bits:.4f} ± {se:.4f} bits/dim (cross-fitted from the Γ file's "
                      "statistics: it holds for the images the Γ job read)")
    if "predicted_nelbo_bpd" in plan:
        bits, se = plan["predicted_nelbo_bpd"], plan["predicted_nelbo_stderr"]
        label = ("in-sample: the statistics that chose the plan score it, biased low" if crossfitted else
                 "predicted from the Γ file's statistics: it holds for the images the Γ job read")
        console.print(f"expected −ELBO: {bits:.4f} ± {se:.4f} bits/dim ({label})")
    else:
        console.print(f"expected −ELBO: not predicted ({plan['predicted_nelbo']})")
    lim = plan.get("limit")
    if isinstance(lim, dict):
        key = "gap_to_limit_crossfit_bpd" if "gap_to_limit_crossfit_bpd" in plan else "gap_to_limit_bpd"
        gap = f"; this plan's gap to it: {plan[key]:+.4f}" if key in plan else ""
        console.print(f"likelihood limit (K = N, KL-optimal σ²): {lim['n_step_bpd']:.4f} ± "
                      f"{lim['n_step_stderr']:.4f} bits/dim; continuous time: "
                      f"{lim['continuous']['bpd']:.4f}{gap}")


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    check_eta(args.method, args.eta)
    plan = make_plan(args.gamma, args.steps, args.method, args.trajectory, args.eta, args.clip_pixel,
                     conventions_from(args))
    if args.report:
        from adpm_dist.stages.plan_report import write_report

        plan["report"] = write_report(args.report, args.gamma, plan, args, conventions_from(args))
    if args.json:
        print(json.dumps(plan))
    else:
        print_table(plan, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_wrapper(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
