"""The text of ``python -m adpm_dist.train --help``: what the flags do, every config key with
its built-in default (generated from the dataclasses, so it cannot drift), the exit statuses."""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Sequence

from adpm_dist.errors import UserArgumentParser
from adpm_dist.train.config import PRESETS, Config, build_config

DESCRIPTION = """\
Train an ε-prediction network (L_simple) with DeepSpeed: one process, or one per GPU/rank
under torchrun or `python -m adpm_dist.launch train`. Rerunning the same command resumes
from the run directory's latest.json; a finished run is a no-op.

Configuration (OmegaConf), later wins: built-in defaults < --preset NAME < --config FILE <
key=value. Values are read as YAML; ${section.key} and ${oc.env:VAR} interpolations resolve
after the last layer. An unknown key or a bad value is refused before anything starts.
The data must exist first: e.g. `python tools/make_shards.py digits data/shards/digits` for
the tiny preset, `python tools/make_shards.py mnist data/shards/mnist` for mnist.

examples:
  python -m adpm_dist.train --preset tiny train.run_dir=runs/tiny
  python -m adpm_dist.train --config configs/cifar10.yaml train.run_dir=s3://bucket/c10 optim.lr=1e-4
  torchrun --nproc_per_node 2 -m adpm_dist.train --preset mnist data.batch_size=256"""

EXIT_STATUSES = """\
exit status:
  0   done (or already done)
  2   user error, one `error:` line: bad flag, unknown key, bad value, missing shards, data
      that does not fit the model, model/schedule mismatch on resume, bad data above
      data.max_bad_fraction (checkpointed first: fix the data, rerun to resume)
  3   train.max_bad_steps non-finite losses in a row (last good state saved)
  75  checkpointed after SIGUSR1/SIGTERM (preemption): rerun to resume

Progress: a bar on a terminal; elsewhere a line `progress: train <done>/<total> (<pct>%)
<rate>/s ETA <h:mm:ss>` on stdout every ADPM_PROGRESS_INTERVAL seconds (default 30).
Every key is explained in docs/train.md."""


def _show(value) -> str:
    """As an override would spell it (YAML): null, true, [0.9,0.999], '' for an empty string."""
    if isinstance(value, str):
        return value or "''"
    return json.dumps(value, separators=(",", ":"))


def config_keys() -> str:
    """``section.key=DEFAULT`` for every key, one section per paragraph."""
    lines = ["config keys (section.key=built-in default; a preset changes many of them):"]
    for section, values in Config().to_dict().items():
        text = "  ".join(f"{section}.{key}={_show(v)}" for key, v in values.items())
        lines += textwrap.wrap(text, width=100, initial_indent="  ", subsequent_indent="    ",
                               break_on_hyphens=False)
    return "\n".join(lines)


def build_parser(parser_class: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = parser_class(
        prog="python -m adpm_dist.train", description=DESCRIPTION,
        epilog=config_keys() + "\n\n" + EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE",
                   help="a YAML config; it may start from a preset with a top-level "
                   "'preset: NAME' key (default: none, built-in defaults)")
    p.add_argument("--preset", metavar="NAME",
                   help=f"start from configs/NAME.yaml, one of {', '.join(PRESETS)} "
                   "(default: none)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="set one config key; the value is read as YAML, e.g. optim.lr=2e-4 "
                   "data.hflip=true data.urls=[a.tar,b.tar] model.options.ch=64")
    return p


def check_argv(argv: Sequence[str]) -> Config:
    """The resolved config of a command line, or the user error it holds (ConfigError, UsageError).

    Reads the --config file and the presets only, never data or checkpoints: the launcher calls
    it before it submits anything, so a typo fails here rather than on the cluster.
    """
    args = build_parser(UserArgumentParser).parse_args(list(argv))
    return build_config(args.config, args.overrides, preset=args.preset)
