"""Collect a tools/reproduce_mnist.sh run folder into one markdown report.

    python tools/results_table.py OUT [--write OUT/RESULTS.md]

Reads what the stages left in OUT: ``nll/nll.json`` (negative ELBO table),
``fid/METHOD-KK/fid.json`` (one FID per method and K), ``gamma.json`` (how many
samples per timestep went into Γ), ``run/metrics.jsonl`` (training loss) and
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

from adpm_dist.evaluate import nll_table  # noqa: E402


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


def fid_section(out: Path) -> str:
    found: dict[tuple[str, int], dict] = {}
    for path in sorted((out / "fid").glob("*-K*/fid.json")):
        m = re.fullmatch(r"(.+)-K(\d+)", path.parent.name)
        if m:
            found[(m.group(1), int(m.group(2)))] = json.loads(path.read_text())
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
    metrics = [m for m in _lines(out / "run" / "metrics.jsonl") if m.get("loss") is not None]
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
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: {out} is not a folder", file=sys.stderr)
        return 2
    report = "\n".join(s for s in (nll_section(out), fid_section(out), run_section(out)) if s)
    grids = sorted(str(g.relative_to(out)) for g in out.glob("samples/*/grid.png"))
    if grids:
        report += "\nsample grids: " + ", ".join(grids) + "\n"
    Path(args.write or out / "RESULTS.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
