#!/usr/bin/env python
"""Merge Γ files from separate runs exactly: sums and counts add.

    python tools/merge_gamma.py A.json B.json … -o OUT.json

Refuses files from different schedules or models (naming both) and
overlapping contributions (the same run's samples twice). Prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys

from adpm_dist.errors import run_cli
from adpm_dist.gamma import GammaFileError, merge, read_gamma, summary, write_gamma


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="Γ files (local, file:// or s3://)")
    p.add_argument("-o", "--out", required=True, help="merged Γ file")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="accept inputs that miss some timesteps (e.g. split by --timesteps)")
    args = p.parse_args(argv)
    files = [read_gamma(u, require_complete=not args.allow_incomplete) for u in args.inputs]
    merged = merge(files, args.inputs)
    if not merged.is_complete() and not args.allow_incomplete:
        raise GammaFileError("the merged file still has timesteps with count 0")
    write_gamma(merged, args.out)
    print(json.dumps({"out": args.out, "inputs": len(files), **summary(merged)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """User errors (a bad, foreign or overlapping Γ file): one ``error:`` line, exit 2."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
