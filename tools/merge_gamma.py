#!/usr/bin/env python
"""Merge Γ files from separate runs exactly: sums and counts add.

    python tools/merge_gamma.py A.json B.json … -o OUT.json [--allow-incomplete]

Refuses files from different schedules or models (naming both) and contributions that
hold the same draws twice (equal seed and data, intersecting sample ids and timesteps;
for files from before those were recorded: the same run id and intersecting sample ids),
naming both files and the timesteps. The model-error moments (format 2) add like the sums;
when some input is a format-1 file (no moments) the merged file has none (format 1): a
``warning:`` line names those inputs and the summary says ``"moments": false``. Prints a summary.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from adpm_dist.errors import UserArgumentParser, run_cli
from adpm_dist.gamma import GammaFileError, lacking_moments, merge, read_gamma, spans, summary, write_gamma


def _main(argv: list[str] | None = None) -> int:
    p = UserArgumentParser(prog="merge_gamma.py", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="Γ files (local, file:// or s3://)")
    p.add_argument("-o", "--out", required=True, help="merged Γ file")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="accept inputs that miss some timesteps (e.g. split by --timesteps); the merged "
                        "file then lacks Γ where no input has it")
    args = p.parse_args(argv)
    files = [read_gamma(u, require_complete=False) for u in args.inputs]
    for url, gf in zip(args.inputs, files):
        missing = np.flatnonzero(gf.count == 0) + 1
        if missing.size and not args.allow_incomplete:
            raise GammaFileError(
                f"{url}: count is 0 at t = {spans(missing.tolist())} (a partial Γ file, e.g. from "
                "estimate --timesteps); --allow-incomplete would merge it anyway (timesteps no input "
                "covers stay without Γ, and trajectories that step from them are refused)")
    merged = merge(files, args.inputs)
    lacking = [args.inputs[i] for i in lacking_moments(files)]
    if lacking and len(lacking) < len(files):
        print(f"warning: {', '.join(lacking)}: format-1 Γ file(s) without the model-error moments; the "
              "merged file has none (format 1): re-run the Γ job for them to keep the moments",
              file=sys.stderr)
    write_gamma(merged, args.out)
    extra = {"without_moments": lacking} if lacking else {}
    print(json.dumps({"out": args.out, "inputs": len(files), **summary(merged), **extra}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """User errors (a bad, foreign or overlapping Γ file): one ``error:`` line, exit 2."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
