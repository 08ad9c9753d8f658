"""The official-code switches as command-line flags, shared by sample, evaluate and plan.

``--official`` selects every choice of the official Analytic-DPM code at once
(:data:`adpm_dist.diffusion.conventions.OFFICIAL`); each single flag overrides one choice,
on top of ours or of ``--official``. The resolved choices are written next to each output.
"""

from __future__ import annotations

import argparse

from adpm_dist.diffusion.analytic import COVARIANCE_FITS
from adpm_dist.diffusion.conventions import OFFICIAL, OURS, Conventions
from adpm_dist.diffusion.residual import DIRECTIONS

ALL = ("covariance_fit", "ddim_direction", "nll_clip_x0", "even_rounding")


def add_convention_flags(parser: argparse.ArgumentParser, which=ALL) -> None:
    group = parser.add_argument_group(
        "official-code switches",
        f"defaults: ours {OURS.describe()}; --official: {OFFICIAL.describe()}")
    group.add_argument("--official", action="store_true",
                       help="make every choice below as the official Analytic-DPM code does")
    if "covariance_fit" in which:
        group.add_argument("--covariance-fit", choices=COVARIANCE_FITS, default=None,
                           help="how (β̄/ᾱ)(1−Γ) is made feasible: weighted (ours: isotonic fit weighted "
                                "by Γ's standard errors), isotonic (unweighted), clip (official)")
    if "ddim_direction" in which:
        group.add_argument("--ddim-direction", choices=DIRECTIONS, default=None,
                           help="DDIM family: the mean's noise direction, x0 (ours: re-derived from the "
                                "clipped x̂₀) or network (official: the network's ε̂)")
    if "nll_clip_x0" in which:
        group.add_argument("--clip-x0", dest="nll_clip_x0", action=argparse.BooleanOptionalAction,
                           default=None, help="NELBO: clamp x̂₀ to the data range in the means "
                                              "(official: yes; ours: no)")
    if "even_rounding" in which:
        group.add_argument("--even-rounding", choices=("half-up", "official"), default=None,
                           help="even trajectory nodes: half-up (ours, exact) or official (float "
                                "accumulation, half to even; differs at single nodes, e.g. N=1000 K=25)")


def conventions_from(args: argparse.Namespace) -> Conventions:
    base = OFFICIAL if getattr(args, "official", False) else OURS
    return base.with_overrides(**{name: getattr(args, name, None) for name in ALL})
