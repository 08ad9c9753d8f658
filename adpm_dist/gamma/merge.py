"""Merging Γ files exactly, and refusing to count the same draws twice.

``contributions`` records what went in: per (run, rank) a pair-sample id range ``samples``
[start, end) and what determines those draws — ``seed``, ``data`` (the data set's identity)
and ``timesteps`` (half-open ranges). Two contributions hold the same draws when seed and
data are equal, their sample ranges intersect and their timesteps do; :func:`merge` refuses
that (it would count them twice). Contributions written before these fields existed carry
only ``run_id`` (which then stood for seed, data and timesteps): two of them overlap when
their run ids are equal and their sample ranges intersect, as before; an old and a new
contribution are never compared.

Sums and counts add, the model-error moments' too; when any input lacks the moments (a
format-1 file) the merge has none (it is format 1) — :func:`summary` says so. Half A's sums
(format 3) add likewise; when any input lacks them the merge has none (format 2): the parity
rule is by sample id, so the merged halves are again "even ids" and "the rest".
"""

from __future__ import annotations

import json
import math

import numpy as np

from adpm_dist.gamma.file import GammaFile, GammaFileError
from adpm_dist.gamma.moments import Moments


def _draw_key(c: dict) -> tuple:
    """What besides sample ids and timesteps determines a contribution's draws (module doc)."""
    if "timesteps" in c:
        return ("draws", c["seed"], json.dumps(c["data"], sort_keys=True))
    return ("run", c["run_id"])  # an old file: the run id stood for seed, data and timesteps


def _shared_timesteps(a: dict, b: dict) -> list[int] | None:
    """Timesteps both contributions drew at (None for old contributions: all of them)."""
    if "timesteps" not in a:
        return None
    sets = [{t for lo, hi in c["timesteps"] for t in range(lo, hi)} for c in (a, b)]
    return sorted(sets[0] & sets[1])


def find_overlap(tagged: list[tuple[str, dict]]) -> tuple | None:
    """First (source, contribution, source, contribution, shared t) holding the same draws twice."""
    groups: dict[tuple, list] = {}
    for src, c in tagged:
        if c["samples"][0] < c["samples"][1]:
            groups.setdefault(_draw_key(c), []).append((src, c))
    for group in groups.values():
        group.sort(key=lambda sc: sc[1]["samples"][0])
        for i, (src_a, a) in enumerate(group):
            for src_b, b in group[i + 1:]:
                if b["samples"][0] >= a["samples"][1]:
                    break  # sorted by start: no later one intersects ``a`` either
                shared = _shared_timesteps(a, b)
                if shared is None or shared:
                    return src_a, a, src_b, b, shared
    return None


def spans(ts: list[int]) -> str:
    """Sorted timesteps as '1..3, 7' (at most 8 spans shown)."""
    runs: list[list[int]] = []
    for t in ts:
        if runs and runs[-1][1] == t - 1:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    text = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in runs[:8])
    return text + (f" and {len(runs) - 8} more" if len(runs) > 8 else "")


def _overlap_error(src_a: str, a: dict, src_b: str, b: dict, shared) -> GammaFileError:
    where = "(the same run id, timesteps unrecorded)" if shared is None else f"at t = {spans(shared)}"
    return GammaFileError(
        f"cannot merge: {src_a} (run {a['run_id']!r}, samples {a['samples']}) and {src_b} (run "
        f"{b['run_id']!r}, samples {b['samples']}) hold the same draws {where}: merging would count "
        "them twice (draws are fixed by seed, data, sample ids and timesteps)")


def _model_mismatch(src: str, got: dict, src0: str, want: dict) -> GammaFileError:
    name, name0 = got.get("name", "?"), want.get("name", "?")
    digests = f"{str(got.get('digest'))[:12]}… and {str(want.get('digest'))[:12]}…"
    if name == name0:
        return GammaFileError(f"cannot merge: {src} and {src0} are for model {name!r}: same architecture "
                              f"and name, different weights (another run or checkpoint; digests {digests})")
    return GammaFileError(
        f"cannot merge: {src} is for model {name!r} ({str(got.get('digest'))[:12]}…) but {src0} is for "
        f"{name0!r} ({str(want.get('digest'))[:12]}…)")


def merge(files: list[GammaFile], sources: list[str] | None = None) -> GammaFile:
    """Exact merge: sums and counts add. Refuses mismatched schedule/model and overlaps."""
    if not files:
        raise GammaFileError("nothing to merge")
    sources = sources or [f"input {i}" for i in range(len(files))]
    first, src0 = files[0], sources[0]
    for gf, src in zip(files[1:], sources[1:]):
        if gf.schedule.get("betas_sha256") != first.schedule.get("betas_sha256"):
            raise GammaFileError(
                f"cannot merge: {src} has schedule {gf.schedule.get('name')!r} "
                f"(N={gf.schedule.get('num_timesteps')}) but {src0} has "
                f"{first.schedule.get('name')!r} (N={first.schedule.get('num_timesteps')})"
            )
        if gf.model.get("digest") != first.model.get("digest"):
            raise _model_mismatch(src, gf.model, src0, first.model)
    tagged = [(src, c) for gf, src in zip(files, sources) for c in gf.contributions]
    clash = find_overlap(tagged)
    if clash:
        raise _overlap_error(*clash)
    sums = (np.sum([getattr(gf, k) for gf in files], axis=0) for k in ("sum", "sum_sq", "count"))
    total, total_sq, count = sums
    moments = None if lacking_moments(files) else Moments.total([gf.moments for gf in files])
    half = None
    if moments is not None and all(gf.half is not None for gf in files):
        half = merge_sums([gf.half for gf in files])
    return GammaFile(dict(first.schedule), dict(first.model), total, total_sq, count.astype(np.int64),
                     data={"merged_from": [gf.data for gf in files]}, contributions=[c for _, c in tagged],
                     moments=moments, half=half)


def merge_sums(files: list[GammaFile]) -> GammaFile:
    """The sums and counts (Γ's and the moments') of ``files`` added; no checks (half A's of a merge)."""
    total, total_sq, count = (np.sum([getattr(gf, k) for gf in files], axis=0)
                              for k in ("sum", "sum_sq", "count"))
    return GammaFile(dict(files[0].schedule), dict(files[0].model), total, total_sq, count.astype(np.int64),
                     moments=Moments.total([gf.moments for gf in files]))


def lacking_moments(files: list[GammaFile]) -> list[int]:
    """Indices of the files without the model-error moments (format 1)."""
    return [i for i, gf in enumerate(files) if not gf.has_moments()]


def summary(gf: GammaFile) -> dict:
    se = gf.stderr
    return {"num_timesteps": gf.num_timesteps, "samples_per_t_min": int(gf.count.min()),
            "samples_per_t_max": int(gf.count.max()), "max_stderr": float(se.max()) if se.size else math.nan,
            "contributions": len(gf.contributions), "moments": gf.has_moments(),
            "halves": gf.half is not None}
