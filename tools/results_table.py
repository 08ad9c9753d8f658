"""Collect a tools/reproduce_mnist.sh run folder into one markdown report.

    python tools/results_table.py OUT [--write OUT/RESULTS.md] [--paper]

Reads what the stages left in OUT: ``nll/nll.json`` (negative ELBO table),
``fid/METHOD-KK/fid.json`` (one FID per method and K), ``gamma.json`` (how many
samples per timestep went into Γ), ``run/metrics/*.jsonl`` (training loss) and
``timings.jsonl`` (wall time per stage). Prints the report and writes it to
OUT/RESULTS.md. A stage that has not run yet is reported as missing, never
filled in.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adpm_dist.stages.evaluate import nll_table  # noqa: E402

# Bao et al., ICLR 2022 (OpenReview 0xiJLKH-ufZ), CIFAR-10 with the linear schedule (LS),
# copied from Table 1 (NLL, bits/dim) and Table 2 (FID, 50k samples, even trajectory).
# "optimal" is the paper's OT; it has no OT row for ddpm-tilde.
PAPER_NLL = {
    ("even", "ddpm-tilde"): {10: 74.95, 25: 24.98, 50: 12.01, 100: 7.08, 200: 5.03, 1000: 3.73},
    ("even", "ddpm-beta"): {10: 6.99, 25: 6.11, 50: 5.44, 100: 4.86, 200: 4.39, 1000: 3.75},
    ("even", "analytic-ddpm"): {10: 5.47, 25: 4.79, 50: 4.38, 100: 4.07, 200: 3.84, 1000: 3.59},
    ("optimal", "ddpm-beta"): {10: 5.38, 25: 4.34, 50: 3.97, 100: 3.82, 200: 3.77, 1000: 3.75},
    ("optimal", "analytic-ddpm"): {10: 4.11, 25: 3.68, 50: 3.61, 100: 3.59, 200: 3.59, 1000: 3.59},
}
PAPER_FID = {
    "ddpm-tilde": {10: 44.45, 25: 21.83, 50: 15.21, 100: 10.94},
    "ddpm-beta": {10: 233.41, 25: 125.05, 50: 66.28, 100: 31.36},
    "analytic-ddpm": {10: 34.26, 25: 11.60, 50: 7.25, 100: 5.40},
    "ddim": {10: 21.31, 25: 10.70, 50: 7.74, 100: 6.08},
    "analytic-ddim": {10: 14.00, 25: 5.81, 50: 4.04, 100: 3.55},
}


def _side_by_side(rows: dict[str, dict[int, float]], paper: dict[str, dict[int, float]],
                  steps: list[int], fmt: str) -> str:
    """Markdown table, one cell per K: "ours / paper" ("—" where either has no number)."""
    lines = ["| row | " + " | ".join(f"K={k}" for k in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, ours in rows.items():
        cells = []
        for k in steps:
            mine = format(ours[k], fmt) if k in ours else "—"
            theirs = format(paper[name][k], ".2f") if name in paper and k in paper[name] else "—"
            cells.append(f"{mine} / {theirs}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paper_section(out: Path) -> str:
    """Our numbers beside the paper's CIFAR-10 (LS) rows (a different dataset: see docs/RESULTS.md)."""
    parts = []
    path = out / "nll" / "nll.json"
    if path.exists():
        ours: dict[str, dict[int, float]] = {}
        for key, r in json.loads(path.read_text())["results"].items():
            traj, k, method = key.split("/")
            ours.setdefault(f"{traj} {method}", {})[int(k[2:])] = r["bpd"]
        paper = {f"{t} {m}": v for (t, m), v in PAPER_NLL.items()}
        steps = sorted({k for row in ours.values() for k in row})
        parts.append("NLL, bits/dim (ours on MNIST / paper on CIFAR-10 LS)\n\n"
                     + _side_by_side(ours, paper, steps, ".2f"))
    fids: dict[str, dict[int, float]] = {}
    for (method, k), doc in fid_results(out).items():
        fids.setdefault(method, {})[k] = doc["fid"]
    if fids:
        order = [m for m in PAPER_FID if m in fids] + sorted(set(fids) - set(PAPER_FID))
        fids = {m: fids[m] for m in order}
        steps = sorted({k for row in fids.values() for k in row} | {10, 25, 50, 100})
        parts.append("FID (ours on MNIST / paper on CIFAR-10 LS)\n\n"
                     + _side_by_side(fids, PAPER_FID, steps, ".2f"))
    if not parts:
        return ""
    return "## Beside the paper (Bao et al. 2022, CIFAR-10 LS, Tables 1 and 2)\n\n" + "\n".join(parts)


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def nll_section(out: Path) -> str:
    path = out / "nll" / "nll.json"
    if not path.exists():
        return "## Negative ELBO (bits/dim)\n\nmissing: nll/nll.json (the NLL stage has not finished)\n"
    doc = json.loads(path.read_text())
    keys = list(doc["results"])
    trajectories = list(dict.fromkeys(k.split("/")[0] for k in keys))
    steps = list(dict.fromkeys(int(k.split("/")[1][2:]) for k in keys))
    methods = list(dict.fromkeys(k.split("/")[2] for k in keys))
    table = nll_table(doc["results"], trajectories, steps, methods)
    return (f"## Negative ELBO (bits/dim, ± standard error over {doc['num_images']} test images)\n\n"
            f"{table}\nwall time {doc['wall_time_s']:.0f} s on {doc['world_size']} rank(s)\n")


def fid_results(out: Path) -> dict[tuple[str, int], dict]:
    """Every finished FID of the run, keyed by (method, K) from its folder name METHOD-KK."""
    found: dict[tuple[str, int], dict] = {}
    for path in sorted((out / "fid").glob("*-K*/fid.json")):
        m = re.fullmatch(r"(.+)-K(\d+)", path.parent.name)
        if m:
            found[(m.group(1), int(m.group(2)))] = json.loads(path.read_text())
    return found


def fid_section(out: Path) -> str:
    found = fid_results(out)
    if not found:
        return ""
    methods = list(dict.fromkeys(m for m, _ in found))
    steps = sorted({k for _, k in found})
    any_doc = next(iter(found.values()))
    rows = ["| method | " + " | ".join(f"K={k}" for k in steps) + " |", "|---|" + "---|" * len(steps)]
    for method in methods:
        cells = [f"{found[(method, k)]['fid']:.2f}" if (method, k) in found else "missing" for k in steps]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return (f"## FID ({any_doc['num_samples']} samples vs {any_doc['num_reference']} test images)\n\n"
            + "\n".join(rows) + "\n")


def run_section(out: Path) -> str:
    parts = []
    # One part per checkpoint segment, named by its first step (zero-padded: name order).
    parts_ = sorted((out / "run" / "metrics").glob("*.jsonl"))
    metrics = [m for p in parts_ for m in _lines(p) if m.get("loss") is not None]
    latest = out / "run" / "latest.json"
    if metrics and latest.exists():
        first, last = metrics[0], metrics[-1]
        steps = json.loads(latest.read_text())["step"]
        parts.append(f"training: {steps} steps; logged loss {first['loss']:.4f} at step {first['step']}, "
                     f"{last['loss']:.4f} at step {last['step']}")
    gamma = out / "gamma.json"
    if gamma.exists():
        from adpm_dist.gamma import read_gamma

        gf = read_gamma(str(gamma), require_complete=False)
        covered = gf.count > 0
        parts.append(f"Γ: {int(covered.sum())} of {gf.num_timesteps} timesteps, "
                     f"{int(gf.count[covered].min())}–{int(gf.count[covered].max())} samples each, "
                     f"max s.e. {gf.stderr[covered].max():.2e}")
    timings = _lines(out / "timings.jsonl")
    if timings:
        spent: dict[str, float] = {}
        for t in timings:  # a rerun appends: a resumed stage's time is the sum of its runs
            spent[t["stage"]] = spent.get(t["stage"], 0.0) + t["wall_s"]
        rows = ["| stage | wall time (s), summed over reruns |", "|---|---|"]
        rows += [f"| {name} | {wall:.1f} |" for name, wall in spent.items()]
        rows.append(f"| **total** | {sum(spent.values()):.1f} |")
        parts.append("\n".join(rows))
    return "## Run\n\n" + "\n\n".join(parts) + "\n" if parts else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the folder tools/reproduce_mnist.sh wrote")
    p.add_argument("--write", default=None, help="report path (default OUT/RESULTS.md)")
    p.add_argument("--paper", action="store_true",
                   help="add our numbers beside the paper's CIFAR-10 (LS) Tables 1 and 2")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: {out} is not a folder", file=sys.stderr)
        return 2
    paper = paper_section(out) if args.paper else ""
    sections = [nll_section(out), fid_section(out), paper, run_section(out)]
    report = "\n".join(s for s in sections if s)
    grids = sorted(str(g.relative_to(out)) for g in out.glob("samples/*/grid.png"))
    if grids:
        report += "\nsample grids: " + ", ".join(grids) + "\n"
    Path(args.write or out / "RESULTS.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
