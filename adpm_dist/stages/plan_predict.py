"""``plan``'s predictions from a Γ file: in-sample, cross-fitted, and the likelihood limit.

Not a stage: shared by :mod:`adpm_dist.stages.plan` and its report
(:mod:`adpm_dist.stages.plan_report`).

**Why cross-fitting.** The in-sample prediction (``predicted_nelbo_bpd``) scores a trajectory
and variances with the same statistics that chose them, so it is biased low — most for the
optimal trajectory (the DP picks the steps whose noise happened to look cheap) and a little for
every statistic-driven σ² (Jensen). A format-3 Γ file keeps its two halves' sums (sample-id
parity, :mod:`adpm_dist.gamma.file`): τ and σ² are chosen on half A and scored on half B, and
the other way round, and the two are averaged. Given the choosing half, the score is linear in
the other half's moments (:func:`~adpm_dist.diffusion.residual.predicted_nelbo`), so each half's
score is an unbiased estimate of the true NELBO of a plan chosen from half the samples — which is
at least as bad as one chosen from all of them: the cross-fitted number is honest (if anything
slightly pessimistic) where the in-sample one is optimistic. Its standard error is
½√(se_A² + se_B²) of the two halves' delta-method standard errors.

**The limit** (:mod:`adpm_dist.diffusion.limit`): the K = N NELBO with the KL-optimal σ²
(``n_step``) — cross-fitted the same way when the halves exist — and the continuous-time
integral (``continuous``), and per prediction the gap to the N-step limit.
"""

from __future__ import annotations

import dataclasses
import math

from adpm_dist.diffusion.analytic import is_ddpm_family
from adpm_dist.diffusion.limit import cap_binds, continuous_limit, n_step_limit, n_step_sigma2
from adpm_dist.diffusion.residual import predicted_nelbo
from adpm_dist.errors import UserError
from adpm_dist.stages.conventions import trajectory_options, variance_options
from adpm_dist.stages.job import resolve_trajectory, resolve_variances


def choose(ref, steps: int, method: str, trajectory: str, eta, clip_pixel, conv):
    """(τ, StepVariances, trajectory options): what ``sample`` would run with ``ref``."""
    topts = trajectory_options(conv, method, trajectory, ref, conv.nll_clip_x0)
    tau = resolve_trajectory(trajectory, ref.schedule, steps, ref.gamma, **topts)
    var = resolve_variances(ref.schedule, tau, method, ref.gamma, eta, clip_pixel,
                            **variance_options(conv, method, ref))
    return tau, var, topts


def nll_variances(ref, tau, method: str, eta, clip_pixel, conv):
    """σ² on ``tau`` as ``evaluate nll`` uses them: for the residual methods from the moments of
    the NLL's ``--clip-x0`` choice (``sample`` clips x̂₀, so its σ² come from the clipped A_t)."""
    return resolve_variances(ref.schedule, tau, method, ref.gamma, eta, clip_pixel,
                             **variance_options(conv, method, ref, conv.nll_clip_x0))


def predicted(ref, var, method: str, clip_x0: bool) -> dict:
    """The in-sample expected −ELBO (bits/dim ± s.e.) from the Γ file's statistics, or why there is none."""
    if not is_ddpm_family(method):
        return {"predicted_nelbo": "defined for the DDPM family only"}
    moments = ref.moments(clip_x0)
    if moments is None:
        return {"predicted_nelbo": "the Γ file has no model-error moments (format 1)"}
    try:
        bits, se = predicted_nelbo(ref.schedule, var.s, var.t, var.lambda2, var.sigma2, moments)
    except ValueError as exc:  # e.g. t = 1 or a step's t not estimated
        return {"predicted_nelbo": str(exc)}
    return {"predicted_nelbo_bpd": bits, "predicted_nelbo_stderr": se, "nll_clip_x0": clip_x0}


def half_refs(ref) -> tuple | None:
    """The Γ file's halves as GammaRefs of their own (same schedule), or None (no halves)."""
    halves = ref.file.halves()
    if halves is None:
        return None
    return tuple(dataclasses.replace(ref, gamma=gf.gamma_vector(), sha256=f"{ref.sha256}:{name}",
                                     url=f"{ref.url} (half {name})", file=gf)
                 for gf, name in zip(halves, "AB"))


def _combine(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean of the two halves' values and its standard error (independent halves)."""
    return (parts[0][0] + parts[1][0]) / 2.0, math.hypot(parts[0][1], parts[1][1]) / 2.0


def crossfit(ref, steps: int, method: str, trajectory: str, eta=0.0, clip_pixel=None, conv=None) -> dict:
    """The cross-fitted prediction (module doc): ``predicted_nelbo_crossfit_bpd`` and ``…_stderr``,
    the two halves' trajectories, or ``predicted_nelbo_crossfit`` saying why there is none."""
    if not is_ddpm_family(method):
        return {"predicted_nelbo_crossfit": "defined for the DDPM family only"}
    refs = half_refs(ref)
    if refs is None:
        return {"predicted_nelbo_crossfit": "the Γ file does not keep its halves (format 3 does)"}
    clip, parts, taus = conv.nll_clip_x0, [], []
    try:
        for pick, judge in ((0, 1), (1, 0)):
            tau = choose(refs[pick], steps, method, trajectory, eta, clip_pixel, conv)[0]
            var = nll_variances(refs[pick], tau, method, eta, clip_pixel, conv)
            parts.append(predicted_nelbo(ref.schedule, var.s, var.t, var.lambda2, var.sigma2,
                                         refs[judge].moments(clip)))
            taus.append([int(t) for t in tau])
    except (UserError, ValueError) as exc:  # a half misses a timestep, or has too few samples
        return {"predicted_nelbo_crossfit": f"not possible: {exc}"}
    bits, se = _combine(parts)
    return {"predicted_nelbo_crossfit_bpd": bits, "predicted_nelbo_crossfit_stderr": se,
            "crossfit_trajectories": {"chosen_on_A": taus[0], "chosen_on_B": taus[1]}}


def limit(ref, clip_x0: bool) -> dict:
    """The likelihood limit (module doc) as a JSON object, or ``{"limit": reason}``."""
    moments = ref.moments(clip_x0)
    if moments is None:
        return {"limit": "the Γ file has no model-error moments (format 1)"}
    try:
        bits, se = n_step_limit(ref.schedule, moments)
        cont = continuous_limit(ref.schedule, moments)
    except ValueError as exc:  # a partial Γ file, or no t = 1
        return {"limit": f"not predicted: {exc}"}
    out = {"n_step_bpd": bits, "n_step_stderr": se, "continuous": cont,
           "cap_binds_at": ranges(cap_binds(moments)), "nll_clip_x0": clip_x0}
    refs = half_refs(ref)
    if refs is not None:
        try:
            parts = []
            for pick, judge in ((0, 1), (1, 0)):
                sigma2 = n_step_sigma2(ref.schedule, refs[pick].moments(clip_x0))["sigma2"]
                parts.append(n_step_limit(ref.schedule, refs[judge].moments(clip_x0), sigma2))
            out["n_step_crossfit_bpd"], out["n_step_crossfit_stderr"] = _combine(parts)
        except ValueError as exc:
            out["n_step_crossfit"] = f"not possible: {exc}"
    return {"limit": out}


def gaps(plan: dict) -> dict:
    """The prediction's gap to the N-step limit, in-sample to in-sample and cross-fitted to
    cross-fitted (bits/dim; positive: above the limit)."""
    lim = plan.get("limit")
    out = {}
    if not isinstance(lim, dict):
        return out
    if "predicted_nelbo_bpd" in plan:
        out["gap_to_limit_bpd"] = plan["predicted_nelbo_bpd"] - lim["n_step_bpd"]
    if "predicted_nelbo_crossfit_bpd" in plan and "n_step_crossfit_bpd" in lim:
        out["gap_to_limit_crossfit_bpd"] = plan["predicted_nelbo_crossfit_bpd"] - lim["n_step_crossfit_bpd"]
    return out


def ranges(ts) -> list[list[int]]:
    """Sorted timesteps as inclusive [first, last] runs: [3, 4, 5, 9] → [[3, 5], [9, 9]]."""
    out: list[list[int]] = []
    for t in (int(t) for t in ts):
        if out and out[-1][1] == t - 1:
            out[-1][1] = t
        else:
            out.append([t, t])
    return out
