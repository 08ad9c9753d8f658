"""The official-code switches as command-line flags, shared by sample, evaluate and plan.

``--official`` selects every choice of the official Analytic-DPM code at once
(:data:`adpm_dist.diffusion.conventions.OFFICIAL`); each single flag overrides one choice,
on top of ours or of ``--official``. The choices that change an output are recorded with it.
"""

from __future__ import annotations

import argparse

from adpm_dist.diffusion.analytic import ANALYTIC_METHODS, COVARIANCE_FITS, RESIDUAL_METHODS, is_ddpm_family
from adpm_dist.diffusion.conventions import OFFICIAL, OURS, Conventions
from adpm_dist.diffusion.residual import DIRECTIONS
from adpm_dist.diffusion.trajectory import DP_COSTS
from adpm_dist.errors import UsageError
from adpm_dist.gamma import require_moments

ALL = ("covariance_fit", "ddim_direction", "nll_clip_x0", "even_rounding", "dp_cost")
# What outputs written before these switches existed were made with (sample folders, NLL files).
LEGACY = {"covariance_fit": "isotonic", "ddim_direction": "x0", "dp_cost": "paper"}

HELP = {
    "covariance_fit": "how (β̄/ᾱ)(1−Γ) is made feasible: weighted (ours: isotonic fit weighted by Γ's "
                      "standard errors), isotonic (unweighted, global), clip (official: Theorem 2's bounds)",
    "ddim_direction": "DDIM family: the mean's noise direction, network (default and official: the "
                      "network's ε̂) or x0 (re-derived from the clipped x̂₀; the default before 2026-12-01)",
    "nll_clip_x0": "NELBO: clamp x̂₀ to the data range in the means (official: yes; ours: no)",
    "even_rounding": "even trajectory nodes: half-up (ours, exact) or official (float accumulation, half "
                     "to even; differs at single nodes, e.g. N=1000 K=25)",
    "dp_cost": "--trajectory optimal minimises: auto (ours: the method's expected NELBO from the Γ file's "
               "model-error moments, the paper's J when it has none), expected (require them), paper "
               "(the paper's J(s,t) for every method, scored with a feasible covariance), official (the "
               "official code's _dp_seg: the timeline cut where Γ first exceeds 1, J on the rest)",
    "decoder": "NELBO decoder: exact (ours: Φ by log_ndtr) or official (the official code's tanh "
               "approximation of Φ with a 1e-12 probability floor; 2e-3 to 5e-3 bits/dim apart)",
}


def add_convention_flags(parser: argparse.ArgumentParser, which=ALL) -> None:
    group = parser.add_argument_group(
        "official-code switches", f"ours: {OURS.describe()}; --official: {OFFICIAL.describe()}")
    group.add_argument("--official", action="store_true",
                       help="make every choice below as the official Analytic-DPM code does")
    choices = {"covariance_fit": COVARIANCE_FITS, "ddim_direction": DIRECTIONS,
               "even_rounding": ("half-up", "official"), "dp_cost": ("auto", *DP_COSTS),
               "decoder": ("exact", "official")}
    for name in which:
        flag = "--clip-x0" if name == "nll_clip_x0" else "--" + name.replace("_", "-")
        if name == "nll_clip_x0":
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=HELP[name])
        else:
            group.add_argument(flag, dest=name, choices=choices[name], default=None, help=HELP[name])


def conventions_from(args: argparse.Namespace) -> Conventions:
    base = OFFICIAL if getattr(args, "official", False) else OURS
    return base.with_overrides(**{name: getattr(args, name, None) for name in base.describe()})


def relevant(conv: Conventions, method: str, trajectory: str) -> dict:
    """The choices that change the output of ``method`` on ``trajectory`` (recorded with it;
    the trajectory's nodes are recorded themselves, so rounding and the DP cost show there)."""
    out = {}
    if method in ANALYTIC_METHODS or trajectory == "optimal":
        out["covariance_fit"] = conv.covariance_fit
    if not is_ddpm_family(method):
        out["ddim_direction"] = conv.ddim_direction
        if conv.zero_noise != "skip":  # where σ² = 0 the official code still draws (and wastes) noise
            out["zero_noise"] = conv.zero_noise
    return out


def dp_cost_for(conv: Conventions, ref) -> str:
    """'expected' or 'paper': ``auto`` resolves by whether the Γ file has the moments."""
    if conv.dp_cost != "auto":
        return conv.dp_cost
    return "expected" if ref is not None and ref.file.has_moments() else "paper"


def trajectory_options(conv: Conventions, method: str, kind: str, ref, clip_x0: bool = True) -> dict:
    """Keyword options of :func:`adpm_dist.stages.job.resolve_trajectory` for ``method``."""
    opts: dict = {"rounding": conv.even_rounding}
    if kind == "optimal":
        cost = dp_cost_for(conv, ref)
        opts.update(fit=conv.covariance_fit, cost=cost, gamma_stderr=gamma_stderr(ref))
        if cost == "expected":
            what = "--trajectory optimal with the expected-NELBO cost (--dp-cost paper does without)"
            opts.update(method=dp_method(method), moments=require_moments(ref, what, clip_x0))
    return opts


def gamma_stderr(ref):
    """The Γ file's standard errors (length N+1), the weights of the ``weighted`` covariance fit;
    None without a Γ file."""
    return None if ref is None else ref.stderr


def dp_method(method: str) -> str:
    """The DDPM-family method whose expected NELBO picks the trajectory of ``method``: itself,
    or for a DDIM-family method its DDPM counterpart (the step KL needs λ² > 0)."""
    if is_ddpm_family(method):
        return method
    return "residual-ddpm" if method in RESIDUAL_METHODS else "analytic-ddpm"


def variance_options(conv: Conventions, method: str, ref, clip_x0: bool = True) -> dict:
    """Keyword options of :func:`adpm_dist.stages.job.resolve_variances` for ``method``."""
    opts: dict = {"fit": conv.covariance_fit, "direction": conv.ddim_direction,
                  "gamma_stderr": gamma_stderr(ref)}
    if method in RESIDUAL_METHODS:
        if ref is None:
            raise UsageError(f"--method {method} needs --gamma (a Γ file with the model-error moments)")
        opts["moments"] = require_moments(ref, f"--method {method}", clip_x0)
    return opts
