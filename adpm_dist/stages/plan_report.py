"""``plan --report DIR``: one page (markdown + PNG plots) that says which method and K to use.

Not a stage: :mod:`adpm_dist.stages.plan` calls :func:`write_report`. The page holds

- ``gamma.png``: Γ_t with its ±2 s.e. band and the infeasible region — Γ_t > 1 (a negative
  covariance) and Γ_t < 1 − SNR_t·((b−a)/2)² (a covariance above Theorem 2's bound), where
  Analytic-DPM's σ² must clip or fit;
- ``moments.png``: A_t (the model's own x̂₀ error) against Analytic-DPM's assumption
  (β̄_t/ᾱ_t)(1 − Γ_t), the value for the optimal ε* (docs/architecture.md);
- ``sigma2.png``: σ² of every DDPM-family method on the chosen trajectory, with its nodes τ;
- ``nelbo_vs_k.png``: the predicted NELBO against K for every DDPM-family method (even and
  optimal trajectories; cross-fitted with ±2 s.e. where the Γ file keeps its halves), with the
  likelihood limit (K = N, KL-optimal σ²) and the continuous-time value as lines;
- the page itself (DIR/report.md): the plan, the limit, and a table of the predictions and their gaps to
  the limit.

Predictions for the optimal trajectory are computed for K ≤ ``OPTIMAL_MAX_K`` (the DP costs
O(K N²) per half and method). Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io
import math

import numpy as np

from adpm_dist.diffusion.analytic import DDPM_FAMILY, RESIDUAL_METHODS
from adpm_dist.diffusion.limit import log_snr
from adpm_dist.errors import UserError
from adpm_dist.gamma import load_for
from adpm_dist.io import storage
from adpm_dist.stages.conventions import variance_options
from adpm_dist.stages.job import resolve_variances
from adpm_dist.stages.plan_predict import choose, crossfit, nll_variances, predicted

KS = (2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)
OPTIMAL_MAX_K = 100
DATA_RANGE = (-1.0, 1.0)
FILES = ("gamma.png", "moments.png", "sigma2.png", "nelbo_vs_k.png")
COLOURS = dict(zip(DDPM_FAMILY, ("tab:blue", "tab:orange", "tab:green", "tab:red")))  # the same in every plot


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def methods_for(ref) -> list[str]:
    """The DDPM-family methods the Γ file can predict (residual ones need the moments)."""
    return [m for m in DDPM_FAMILY if m not in RESIDUAL_METHODS or ref.file.has_moments()]


def sweep(ref, conv, clip_pixel=None, ks=KS) -> list[dict]:
    """Predicted NELBO (in-sample and cross-fitted) for every method, K ≤ N and trajectory."""
    rows = []
    n = ref.schedule.num_timesteps
    for k in sorted({k for k in ks if k <= n} | {n}):  # K = N: residual-ddpm's value is the limit
        optimal = 2 < k < n and k <= OPTIMAL_MAX_K  # K = 2 and K = N: one trajectory only
        for trajectory in ("even", "optimal") if optimal else ("even",):
            for method in methods_for(ref):
                try:
                    tau = choose(ref, k, method, trajectory, 0.0, clip_pixel, conv)[0]
                    var = nll_variances(ref, tau, method, 0.0, clip_pixel, conv)
                except UserError:
                    continue  # e.g. a partial Γ file without this trajectory's timesteps
                row = {"K": k, "trajectory": trajectory, "method": method}
                row.update(predicted(ref, var, method, conv.nll_clip_x0))
                row.update(crossfit(ref, k, method, trajectory, 0.0, clip_pixel, conv))
                if "predicted_nelbo_bpd" in row:
                    rows.append(row)
    return rows


def honest(row: dict) -> tuple[float, float]:
    """(value, s.e.): the cross-fitted prediction where there is one, else the in-sample one."""
    if "predicted_nelbo_crossfit_bpd" in row:
        return row["predicted_nelbo_crossfit_bpd"], row["predicted_nelbo_crossfit_stderr"]
    return row["predicted_nelbo_bpd"], row["predicted_nelbo_stderr"]


def plot_gamma(plt, ref):
    gf, sched = ref.file, ref.schedule
    t = np.flatnonzero(gf.count > 0) + 1
    g, se = gf.gamma[t - 1], gf.stderr[t - 1]
    snr = np.exp(log_snr(sched))[t]
    lower = 1.0 - snr * ((DATA_RANGE[1] - DATA_RANGE[0]) / 2.0) ** 2
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(1.05, float(np.max(g + 2 * se)) * 1.02)
    ax.axhspan(1.0, top, color="tab:red", alpha=0.12, label="infeasible: Γ_t > 1")
    ax.fill_between(t, 0.0, np.clip(lower, 0.0, None), color="tab:orange", alpha=0.15,
                    label="infeasible: covariance above Theorem 2's bound")
    ax.fill_between(t, g - 2 * se, g + 2 * se, color="tab:blue", alpha=0.3, label="±2 s.e.")
    ax.plot(t, g, color="tab:blue", lw=1, label="Γ_t = E‖ε_θ‖²/d")
    bad = (g > 1.0) | (g < lower)
    if bad.any():
        ax.plot(t[bad], g[bad], "x", color="tab:red", ms=4, label=f"estimate infeasible ({int(bad.sum())} t)")
    ax.set(xlabel="t", ylabel="Γ_t", ylim=(min(0.0, float(g.min())), top),
           title=f"Γ_t — {gf.model.get('name', '?')}, {sched.name} N={sched.num_timesteps}")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_moments(plt, ref, clip_x0: bool):
    moments = ref.moments(clip_x0)
    sched = ref.schedule
    fig, ax = plt.subplots(figsize=(7, 4))
    t = np.flatnonzero(np.isfinite(ref.gamma)) if moments is None else np.flatnonzero(np.isfinite(moments.a))
    t = t[t >= 1]
    assumed = sched.bar_betas[t] / sched.alphas_cumprod[t] * (1.0 - ref.gamma[t])
    ax.semilogy(t, np.where(assumed > 0, assumed, np.nan), color="tab:grey", lw=1,
                label="Analytic-DPM's assumption (β̄/ᾱ)(1 − Γ_t)")
    if moments is not None:
        a, se = moments.a[t], moments.a_stderr[t]
        ax.fill_between(t, np.maximum(a - 2 * se, 1e-12), a + 2 * se, color="tab:green", alpha=0.3)
        label = f"A_t = E‖x₀ − x̂₀{'ᶜ' if clip_x0 else ''}‖²/d ±2 s.e."
        ax.semilogy(t, a, color="tab:green", lw=1, label=label)
    else:
        ax.text(0.5, 0.5, "format-1 Γ file: no model-error moments", transform=ax.transAxes, ha="center")
    ax.axhline(((DATA_RANGE[1] - DATA_RANGE[0]) / 2.0) ** 2, color="tab:red", lw=0.6, ls="--",
               label="Theorem 2's bound ((b−a)/2)²")
    ax.set(xlabel="t", ylabel="per-dimension x̂₀ error", title="The model's own error against the assumed one")
    ax.legend(fontsize=7)
    return fig


def plot_sigma2(plt, ref, conv, plan: dict, args):
    """σ² of every DDPM-family method on the plan's own τ (grey lines), the plan's method thicker."""
    fig, ax = plt.subplots(figsize=(7, 4))
    tau = np.asarray(plan["trajectory"])
    for method in dict.fromkeys([args.method, *methods_for(ref)]):
        try:
            var = resolve_variances(ref.schedule, tau, method, ref.gamma, args.eta if method == args.method
                                    else 0.0, args.clip_pixel, **variance_options(conv, method, ref))
        except UserError:
            continue
        ax.semilogy(var.t, var.sigma2, marker="o", ms=3, lw=2.2 if method == args.method else 0.9,
                    color=COLOURS.get(method),
                    label=method + (" (the plan's)" if method == args.method else ""))
    for node in tau:
        ax.axvline(node, color="grey", lw=0.3, alpha=0.6)
    ax.set(xlabel="t (step t → s; grey lines: the plan's nodes τ)", ylabel="σ²",
           title=f"σ² per method on the plan's τ ({args.method}, {args.trajectory}, K={args.steps})")
    ax.legend(fontsize=7)
    return fig


def plot_nelbo(plt, rows: list[dict], limit: dict | None):
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for method in DDPM_FAMILY:
        for trajectory, style in (("even", "-"), ("optimal", "--")):
            sel = [r for r in rows if r["method"] == method and r["trajectory"] == trajectory]
            if not sel:
                continue
            k = [r["K"] for r in sel]
            val, se = np.array([honest(r) for r in sel]).T
            ax.errorbar(k, val, yerr=2 * se, ls=style, marker="o", ms=3, lw=1, capsize=2, elinewidth=0.6,
                        color=COLOURS.get(method), label=f"{method}, {trajectory}")
    if limit is not None:
        lim = limit.get("n_step_crossfit_bpd", limit["n_step_bpd"])
        ax.axhline(lim, color="black", lw=1, label=f"limit: K = N, KL-optimal σ² ({lim:.3f})")
        ax.axhline(limit["continuous"]["bpd"], color="black", lw=0.8, ls=":",
                   label=f"continuous time ({limit['continuous']['bpd']:.3f})")
    ax.set_xscale("log")
    ks = sorted({r["K"] for r in rows})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    if rows:  # K = 2 can be far above everything else: show the useful range (the table has all)
        vals = np.array([honest(r)[0] for r in rows])
        low = min(float(vals.min()), limit["n_step_bpd"] if limit else math.inf)
        ax.set_ylim(low - 0.05, low + max(0.5, 2.5 * (float(np.median(vals)) - low)))
    ax.set(xlabel="K (steps)", ylabel="predicted −ELBO (bits/dim)",
           title="Predicted −ELBO vs K (±2 s.e.; cross-fitted where the Γ file keeps its halves)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _save(plt, fig, url: str) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(url, buf.getvalue())


def _fmt(x, se=None) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.4f}" if se is None else f"{x:.4f} ± {se:.4f}"


def _plan_lines(plan: dict, lim: dict | None) -> list[str]:
    lines = []
    for key, label in (("predicted_nelbo_crossfit", "predicted −ELBO, cross-fitted"),
                       ("predicted_nelbo", "predicted −ELBO, in-sample")):
        if f"{key}_bpd" in plan:
            lines.append(f"- {label}: {_fmt(plan[f'{key}_bpd'], plan[f'{key}_stderr'])} bits/dim")
    if lim:
        crossfitted = (f" (cross-fitted {_fmt(lim['n_step_crossfit_bpd'], lim['n_step_crossfit_stderr'])})"
                       if "n_step_crossfit_bpd" in lim else "")
        lines += [f"- likelihood limit (K = N, KL-optimal σ²): "
                  f"{_fmt(lim['n_step_bpd'], lim['n_step_stderr'])}{crossfitted} bits/dim",
                  f"- continuous-time limit (VDM's L∞ on the grid): {_fmt(lim['continuous']['bpd'])} "
                  "bits/dim",
                  f"- this plan's gap to the limit: {_fmt(plan.get('gap_to_limit_bpd'))} bits/dim"]
        binds = lim["cap_binds_at"]
        if binds:
            where = ", ".join(f"{lo}" if lo == hi else f"{lo}–{hi}" for lo, hi in binds[:6])
            lines.append(f"- Theorem 2's cap binds (A_t > 1: residual-ddpm's σ² capped, not KL-optimal) at "
                         f"t = {where}{' …' if len(binds) > 6 else ''}")
    return lines


def markdown(ref, plan: dict, rows: list[dict], args) -> str:
    """The page: the plan, the limit, the pictures, the table of predictions and the advice."""
    gf, sched = ref.file, ref.schedule
    lim = plan.get("limit") if isinstance(plan.get("limit"), dict) else None
    halves = gf.half is not None
    how = ("halves kept: predictions are cross-fitted (chosen on one half, scored on the other)." if halves
           else "no halves (format < 3): predictions are in-sample, biased low for optimal trajectories.")
    lines = [f"# plan report — {gf.model.get('name', '?')} ({sched.name}, N = {sched.num_timesteps})", "",
             f"Γ file: `{storage.redact(ref.url)}` (sha256 {ref.sha256[:12]}…), {int(gf.count.min())}–"
             f"{int(gf.count.max())} samples per t; {how}", "",
             f"## The plan: {args.method}, {args.trajectory} trajectory, K = {args.steps}", "",
             f"τ = {plan['trajectory']}", ""] + _plan_lines(plan, lim)
    lines += ["", "## Pictures", ""] + [f"![{f[:-4]}]({f})" for f in FILES]
    lines += ["", "## Predicted −ELBO (bits/dim) by K, method and trajectory", "",
              "value ± s.e. (" + ("cross-fitted" if halves else "in-sample") + "); gap: to the limit", "",
              "| K | trajectory | method | predicted | in-sample | gap |", "|---|---|---|---|---|---|"]
    ref_lim = None
    if lim:
        ref_lim = lim.get("n_step_crossfit_bpd", lim["n_step_bpd"]) if halves else lim["n_step_bpd"]
    for r in rows:
        val, se = honest(r)
        gap = val - ref_lim if ref_lim is not None else None
        lines.append(f"| {r['K']} | {r['trajectory']} | {r['method']} | {_fmt(val, se)} | "
                     f"{_fmt(r['predicted_nelbo_bpd'])} | {_fmt(gap)} |")
    lines += ["", "## Which method and K", ""] + advice(rows, ref_lim)
    return "\n".join(lines) + "\n"


def advice(rows: list[dict], limit_bpd) -> list[str]:
    """Per K the best (method, trajectory) by the honest prediction, and the smallest K within
    0.05 bits/dim of the limit."""
    out = []
    for k in sorted({r["K"] for r in rows}):
        best = min((r for r in rows if r["K"] == k), key=lambda r: honest(r)[0])
        out.append(f"- K = {k}: {best['method']} on the {best['trajectory']} trajectory, "
                   f"{_fmt(*honest(best))} bits/dim")
    if limit_bpd is not None:
        near = [r for r in rows if honest(r)[0] - limit_bpd <= 0.05]
        if near:
            r = min(near, key=lambda r: (r["K"], honest(r)[0]))
            out.append(f"- the smallest K within 0.05 bits/dim of the limit: K = {r['K']} "
                       f"({r['method']}, {r['trajectory']})")
    return out


def write_report(out_dir: str, gamma_url: str, plan: dict, args, conv) -> dict:
    """Write ``out_dir``/report.md and its PNGs (module doc); returns where they are."""
    ref = load_for(None, gamma_url)
    rows = sweep(ref, conv, args.clip_pixel)
    lim = plan.get("limit") if isinstance(plan.get("limit"), dict) else None
    plt = _pyplot()
    base = out_dir.rstrip("/")
    figures = (plot_gamma(plt, ref), plot_moments(plt, ref, conv.nll_clip_x0),
               plot_sigma2(plt, ref, conv, plan, args),
               plot_nelbo(plt, rows, lim))
    for fig, name in zip(figures, FILES):
        _save(plt, fig, f"{base}/{name}")
    storage.write_text(f"{base}/report.md", markdown(ref, plan, rows, args))
    return {"markdown": f"{base}/report.md", "plots": [f"{base}/{f}" for f in FILES], "rows": len(rows)}
