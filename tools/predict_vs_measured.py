#!/usr/bin/env python
"""Compare plan's predictions (in-sample and cross-fitted) with measured NLLs, row by row.

    python tools/predict_vs_measured.py G.json NLL_DIR/nll.json [MORE/nll.json …] [--official]

For every DDPM-family row "TRAJECTORY/K=k/METHOD" of the ``evaluate nll`` files, runs
``plan``'s prediction on the same Γ file with the same conventions and prints one JSON line
per row — measured ± s.e., in-sample and cross-fitted predictions ± s.e., and
z = (predicted − measured)/√(se_p² + se_m²) for both — then a summary line with the number
of rows where |z| ≤ 2, the largest |z|, and the likelihood limit with each row's gap to it.
"""

from __future__ import annotations

import json
import math
import sys

from adpm_dist.diffusion.analytic import is_ddpm_family
from adpm_dist.errors import UserArgumentParser, run_cli
from adpm_dist.stages.conventions import add_convention_flags, conventions_from
from adpm_dist.stages.plan import make_plan


def z_score(pred: float | None, pred_se: float | None, meas: float, meas_se: float) -> float | None:
    if pred is None:
        return None
    return (pred - meas) / math.sqrt((pred_se or 0.0) ** 2 + meas_se**2)


def rows_of(gamma: str, nll_path: str, conv) -> list[dict]:
    doc = json.loads(open(nll_path).read())
    out = []
    for key, res in doc["results"].items():
        trajectory, k, method = key.split("/")
        if not is_ddpm_family(method):
            continue
        plan = make_plan(gamma, int(k.split("=")[1]), method, trajectory, conv=conv)
        measured_tau = doc.get("trajectories", {}).get(key, plan["trajectory"])
        row = {"row": key, "measured": res["bpd"], "measured_se": res["bpd_stderr"],
               "in_sample": plan.get("predicted_nelbo_bpd"),
               "in_sample_se": plan.get("predicted_nelbo_stderr"),
               "crossfit": plan.get("predicted_nelbo_crossfit_bpd"),
               "crossfit_se": plan.get("predicted_nelbo_crossfit_stderr"),
               "gap_to_limit": plan.get("gap_to_limit_crossfit_bpd", plan.get("gap_to_limit_bpd")),
               "same_trajectory": plan["trajectory"] == measured_tau}
        for name in ("in_sample", "crossfit"):
            row[f"z_{name}"] = z_score(row[name], row[f"{name}_se"], row["measured"], row["measured_se"])
        row["limit"] = plan.get("limit")
        out.append(row)
    return out


def main(argv=None) -> int:
    p = UserArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gamma")
    p.add_argument("nll", nargs="+")
    add_convention_flags(p)
    args = p.parse_args(argv)
    conv = conventions_from(args)
    rows = [r for path in args.nll for r in rows_of(args.gamma, path, conv)]
    limit = rows[0].pop("limit") if rows else None
    for r in rows:
        r.pop("limit", None)
        print(json.dumps(r))
    summary = {"rows": len(rows), "limit": limit}
    for key in ("z_in_sample", "z_crossfit"):
        zs = [abs(r[key]) for r in rows if r[key] is not None]
        summary[key] = {"within_2": sum(z <= 2 for z in zs), "of": len(zs), "max_abs": max(zs, default=None)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
