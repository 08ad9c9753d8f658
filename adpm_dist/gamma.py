"""The Γ file: one JSON object, format "adpm-gamma/1". Write, read, validate, merge.

Γ_n := E_{x_n~q_n} ‖ε_θ(x_n, n)‖²/d (docs/architecture.md). The file keeps the sufficient
statistics per n = 1..N — ``sum`` (Σ‖ε‖²/d), ``sum_sq`` (Σ(‖ε‖²/d)²),
``count`` — so that separate runs merge exactly; ``gamma`` and ``stderr`` are
derived from them. ``contributions`` records what went in: per (run, rank) a pair-sample
id range ``samples`` [start, end) and what determines those draws — ``seed``, ``data``
(the data set's identity) and ``timesteps`` (half-open ranges). Two contributions hold the
same draws when seed and data are equal, their sample ranges intersect and their timesteps
do; :func:`merge` refuses that (it would count them twice). Contributions written before
these fields existed carry only ``run_id`` (which then stood for seed, data and timesteps):
two of them overlap when their run ids are equal and their sample ranges intersect, as before;
an old and a new contribution are never compared.

JSON only — never pickle: a Γ file can come from anyone's bucket.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np

from adpm_dist import __version__
from adpm_dist.diffusion.stats import mean_stderr
from adpm_dist.errors import UserError

FORMAT = "adpm-gamma/1"
PER_T_FIELDS = ("sum", "sum_sq", "count", "gamma", "stderr")


class GammaFileError(UserError, ValueError):
    """A Γ file is malformed or does not fit the schedule/model it is used with."""


@dataclass
class GammaFile:
    schedule: dict
    model: dict
    sum: np.ndarray
    sum_sq: np.ndarray
    count: np.ndarray
    data: dict = field(default_factory=dict)
    contributions: list = field(default_factory=list)
    created: str = ""
    adpm_dist_version: str = __version__
    extra: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, schedule, model: dict, data: dict | None = None) -> GammaFile:
        n = schedule.num_timesteps
        return cls(schedule.describe(), dict(model), np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64),
                   data=dict(data or {}))

    @property
    def num_timesteps(self) -> int:
        return int(self.schedule["num_timesteps"])

    @property
    def gamma(self) -> np.ndarray:
        """Γ_n for n = 1..N (length N)."""
        return mean_stderr(self.sum, self.sum_sq, self.count)[0]

    @property
    def stderr(self) -> np.ndarray:
        return mean_stderr(self.sum, self.sum_sq, self.count)[1]

    def gamma_vector(self) -> np.ndarray:
        """Γ as length N+1 (index 0 unused, NaN), the layout the diffusion maths uses.

        Timesteps without samples (a Γ job run with ``--timesteps``) are NaN, so
        that using them fails loudly instead of reading as Γ = 0.
        """
        return np.concatenate([[np.nan], np.where(self.count > 0, self.gamma, np.nan)])

    def missing_timesteps(self) -> np.ndarray:
        """The timesteps n (1..N) that have no samples."""
        return np.flatnonzero(self.count == 0) + 1

    def is_complete(self) -> bool:
        return bool(np.all(self.count > 0))

    def add(self, t: np.ndarray, values: np.ndarray) -> None:
        """Accumulate per-sample ‖ε‖²/d ``values`` observed at timesteps ``t`` (1..N)."""
        t = np.asarray(t, dtype=np.int64) - 1
        v = np.asarray(values, dtype=np.float64)
        np.add.at(self.sum, t, v)
        np.add.at(self.sum_sq, t, v * v)
        np.add.at(self.count, t, 1)

    def all_reduce(self) -> GammaFile:
        """Sum ``sum``/``sum_sq``/``count`` over every rank, in place (float64; a no-op alone).

        The one collective of the Γ job's rounds: afterwards every rank holds the
        totals. Counts travel as float64, exact up to 2**53.
        """
        import torch

        from adpm_dist.io import dist

        n = self.sum.shape[0]
        packed = torch.from_numpy(np.concatenate([self.sum, self.sum_sq, self.count.astype(np.float64)]))
        total = dist.all_reduce_sum(packed.clone()).numpy()
        self.sum, self.sum_sq = total[:n].copy(), total[n:2 * n].copy()
        self.count = np.rint(total[2 * n:]).astype(np.int64)
        return self

    def to_dict(self) -> dict:
        mean, stderr = mean_stderr(self.sum, self.sum_sq, self.count)
        out = {"format": FORMAT, "schedule": self.schedule, "model": self.model, "data": self.data,
               "sum": self.sum.tolist(), "sum_sq": self.sum_sq.tolist(), "count": self.count.tolist(),
               "gamma": mean.tolist(), "stderr": stderr.tolist(), "contributions": self.contributions,
               "created": self.created or _now(), "adpm_dist_version": self.adpm_dist_version}
        if self.extra:
            out["extra"] = self.extra
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _per_t_arrays(obj: dict, n: int, fail, require_complete: bool) -> dict:
    """The validated float64 ``sum``, ``sum_sq`` and ``count`` of a parsed Γ file."""
    arrays = {}
    for key in ("sum", "sum_sq", "count"):
        val = obj[key]
        if not isinstance(val, list) or len(val) != n:
            got = len(val) if isinstance(val, list) else type(val).__name__
            fail(f"field '{key}' must be a list of length N={n}, got {got}")
        try:
            arr = np.asarray(val, dtype=np.float64)
        except (TypeError, ValueError):
            fail(f"field '{key}' holds non-numbers")
        if not np.all(np.isfinite(arr)):
            bad = (np.flatnonzero(~np.isfinite(arr))[:5] + 1).tolist()
            fail(f"field '{key}' is not finite at n = {bad}")
        arrays[key] = arr
    count = arrays["count"]
    if np.any(count < 0) or np.any(count != np.round(count)):
        fail("field 'count' must hold non-negative integers")
    if require_complete and np.any(count <= 0):
        bad = (np.flatnonzero(count <= 0)[:5] + 1).tolist()
        fail(f"count is 0 at n = {bad}…: Γ was not estimated at every timestep")
    if np.any(arrays["sum"] < 0) or np.any(arrays["sum_sq"] < 0):
        fail("sum and sum_sq of squared norms cannot be negative")
    return arrays


def _is_range(r) -> bool:
    return isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r) and r[0] <= r[1]


def _draw_fields_ok(c: dict) -> bool:
    """seed (int), data (object), timesteps ([[start, end), …]) — all or, in old files, none."""
    if not {"seed", "data", "timesteps"} & set(c):
        return True
    ts = c.get("timesteps")
    return (isinstance(c.get("seed"), int) and isinstance(c.get("data"), dict) and isinstance(ts, list)
            and all(_is_range(r) for r in ts))


def _contributions(contributions, fail) -> list:
    if not isinstance(contributions, list):
        fail("field 'contributions' must be a list")
    for i, c in enumerate(contributions):
        ok = isinstance(c, dict) and isinstance(c.get("run_id"), str) and _is_range(c.get("samples"))
        if not (ok and _draw_fields_ok(c)):
            fail(f"contributions[{i}] needs run_id (str), rank, world_size, samples [start, end] and "
                 "(since draws are identified) seed, data and timesteps [[start, end), …]")
    return list(contributions)


def from_dict(obj, source: str = "<Γ file>", require_complete: bool = True) -> GammaFile:
    """Validate a parsed Γ file and build a :class:`GammaFile`; errors name ``source``."""

    def fail(msg: str):
        raise GammaFileError(f"{source}: {msg}")

    if not isinstance(obj, dict):
        fail("not a JSON object")
    if obj.get("format") != FORMAT:
        fail(f"format is {obj.get('format')!r}, expected {FORMAT!r}")
    for key in ("schedule", "model", "sum", "sum_sq", "count", "contributions"):
        if key not in obj:
            fail(f"missing field '{key}'")
    sched = obj["schedule"]
    if not isinstance(sched, dict) or not {"name", "num_timesteps", "betas_sha256"} <= set(sched):
        fail("field 'schedule' needs name, num_timesteps and betas_sha256")
    if not isinstance(obj["model"], dict) or "digest" not in obj["model"]:
        fail("field 'model' needs a digest")
    n = sched["num_timesteps"]
    if not isinstance(n, int) or n < 1:
        fail(f"schedule.num_timesteps must be a positive integer, got {n!r}")
    arrays = _per_t_arrays(obj, n, fail, require_complete)
    contributions = _contributions(obj["contributions"], fail)
    return GammaFile(dict(sched), dict(obj["model"]), arrays["sum"], arrays["sum_sq"],
                     arrays["count"].astype(np.int64), data=dict(obj.get("data") or {}),
                     contributions=list(contributions), created=str(obj.get("created", "")),
                     adpm_dist_version=str(obj.get("adpm_dist_version", "")),
                     extra=dict(obj.get("extra") or {}))


def loads(text: str, source: str = "<Γ file>", require_complete: bool = True) -> GammaFile:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GammaFileError(f"{source}: not valid JSON ({exc})") from None
    return from_dict(obj, source, require_complete)


def _read_raw(url: str) -> tuple[bytes, str]:
    """The bytes of the Γ file at ``url`` and their text; a missing or non-text file is named."""
    from adpm_dist.io import storage

    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        raise GammaFileError(f"{url}: no such Γ file") from None
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GammaFileError(f"{url}: not UTF-8 text (not a Γ file)") from None


def read_gamma(url: str, require_complete: bool = True) -> GammaFile:
    return loads(_read_raw(url)[1], url, require_complete)


def write_gamma(gamma_file: GammaFile, url: str) -> None:
    """Write atomically: nothing half-written is ever visible under ``url``."""
    from adpm_dist.io import storage

    storage.write_text(url, gamma_file.to_json())


def check_schedule(gamma_file: GammaFile, schedule, source: str = "Γ file") -> None:
    """Refuse a Γ file estimated under another schedule, naming both."""
    want = schedule.describe()
    got = gamma_file.schedule
    if (got.get("betas_sha256"), got.get("num_timesteps")) != (want["betas_sha256"], want["num_timesteps"]):
        raise GammaFileError(
            f"{source} was estimated for schedule {got.get('name')!r} "
            f"(N={got.get('num_timesteps')}, betas sha256 {str(got.get('betas_sha256'))[:12]}…) "
            f"but the model uses {want['name']!r} (N={want['num_timesteps']}, "
            f"betas sha256 {want['betas_sha256'][:12]}…)"
        )


def check_model(gamma_file: GammaFile, digest: str, name: str = "", source: str = "Γ file") -> None:
    """Refuse a Γ file estimated with another network, naming both."""
    got = gamma_file.model
    if got.get("digest") != digest:
        raise GammaFileError(
            f"{source} was estimated with model {got.get('name', '?')!r} "
            f"(digest {str(got.get('digest'))[:12]}…) but the model in use is {name or '?'!r} "
            f"(digest {digest[:12]}…)"
        )


@dataclass(frozen=True, eq=False)
class GammaRef:
    """A Γ file as its consumers use it: read once, hashed, checked (see :func:`load_for`).

    ``gamma`` is the length-(N+1) vector (index 0 and missing timesteps NaN),
    ``sha256`` the digest of the very bytes that were parsed, ``schedule`` the
    schedule it was checked against (or rebuilt from the file when no model was given).
    """

    gamma: np.ndarray
    sha256: str
    url: str
    file: GammaFile
    schedule: object


def load_for(model, url: str, schedule=None) -> GammaRef:
    """Read the Γ file at ``url`` ONCE and check it fits ``model`` (a LoadedModel, or None).

    Checks, each naming the file and both sides: the format (:func:`loads`), the
    schedule (``model.schedule``, else ``schedule``, else the file's own schedule
    description must rebuild with its betas digest) and, given a model, its digest.
    Partial files (a Γ job run with ``--timesteps``) are accepted; the trajectory
    and variance code refuses the timesteps they lack.
    """
    from adpm_dist.diffusion.schedule import schedule_from_description

    raw, text = _read_raw(url)
    gf = loads(text, url, require_complete=False)
    source = f"Γ file {url}"
    sched = model.schedule if model is not None else schedule
    if sched is None:
        try:
            sched = schedule_from_description(gf.schedule, source)
        except ValueError as exc:
            raise GammaFileError(str(exc)) from None
    check_schedule(gf, sched, source=source)
    if model is not None:
        check_model(gf, model.digest, model.name, source=source)
    return GammaRef(gf.gamma_vector(), hashlib.sha256(raw).hexdigest(), url, gf, sched)


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
            raise GammaFileError(
                f"cannot merge: {src} is for model {gf.model.get('name', '?')!r} "
                f"({str(gf.model.get('digest'))[:12]}…) but {src0} is for "
                f"{first.model.get('name', '?')!r} ({str(first.model.get('digest'))[:12]}…)"
            )
    tagged = [(src, c) for gf, src in zip(files, sources) for c in gf.contributions]
    clash = find_overlap(tagged)
    if clash:
        raise _overlap_error(*clash)
    sums = (np.sum([getattr(gf, k) for gf in files], axis=0) for k in ("sum", "sum_sq", "count"))
    total, total_sq, count = sums
    return GammaFile(dict(first.schedule), dict(first.model), total, total_sq, count.astype(np.int64),
                     data={"merged_from": [gf.data for gf in files]}, contributions=[c for _, c in tagged])


def summary(gf: GammaFile) -> dict:
    se = gf.stderr
    return {"num_timesteps": gf.num_timesteps, "samples_per_t_min": int(gf.count.min()),
            "samples_per_t_max": int(gf.count.max()), "max_stderr": float(se.max()) if se.size else math.nan,
            "contributions": len(gf.contributions)}
