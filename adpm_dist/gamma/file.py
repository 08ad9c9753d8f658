"""The Γ file: one JSON object. Write, read, validate.

Formats "adpm-gamma/3" and "/2" (written now) and "adpm-gamma/1" (still read). Γ_n := E_{x_n~q_n}
‖ε_θ(x_n, n)‖²/d (docs/architecture.md). The file keeps the sufficient statistics per
n = 1..N — ``sum`` (Σ‖ε‖²/d), ``sum_sq`` (Σ(‖ε‖²/d)²), ``count`` — so that separate runs
merge exactly; ``gamma`` and ``stderr`` are derived from them. Format 2 adds ``moments``:
the same kind of sums for the model's own error (:mod:`adpm_dist.gamma.moments`). A file
without them (an old one, or a merge with one) is written and read as format 1. Format 3 adds
``halves``: the same sums (Γ's and the moments') over the pairs whose sample id is even — half
A; half B is the total minus half A. They let ``plan`` cross-fit its NELBO prediction (choose on
one half, predict on the other: :mod:`adpm_dist.diffusion.limit`). A file whose halves are not
known (format 2, a merge with one, a job resumed from an older partial state) is format 2.
``contributions`` records what went in (:mod:`adpm_dist.gamma.merge` says how it is used).

JSON only — never pickle: a Γ file can come from anyone's bucket.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass, field

import numpy as np

from adpm_dist import __version__
from adpm_dist.diffusion.residual import ErrorMoments
from adpm_dist.diffusion.stats import mean_stderr
from adpm_dist.errors import UserError
from adpm_dist.gamma.moments import PER_T, SIGNED, Moments, finite_array, moments_from_dict

FORMAT_1 = "adpm-gamma/1"  # Γ's sums only
FORMAT = "adpm-gamma/2"  # + the model-error moments
FORMAT_3 = "adpm-gamma/3"  # + the two halves' sums (sample-id parity), for cross-fitting
FORMATS = (FORMAT_1, FORMAT, FORMAT_3)
HALF_RULE = "half A: the pairs whose sample id is even; half B: the total minus half A"
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
    moments: Moments | None = None  # None: a format-1 file
    half: GammaFile | None = None  # half A's sums (format 3; module doc); None: halves unknown
    source: str = field(default="", compare=False)  # where it was read from (for messages)

    @classmethod
    def empty(cls, schedule, model: dict, data: dict | None = None, moments: bool = False,
              halves: bool = False) -> GammaFile:
        """No samples yet; ``moments`` True keeps the model-error moments too, ``halves`` (needs
        ``moments``) half A's sums besides the totals (the Γ job keeps both)."""
        n = schedule.num_timesteps
        half = cls.empty(schedule, model, data, moments=True) if halves and moments else None
        return cls(schedule.describe(), dict(model), np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64),
                   data=dict(data or {}), moments=Moments.zeros(n) if moments else None, half=half)

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

    def has_moments(self) -> bool:
        """Does the file carry the model-error moments (format 2)?"""
        return self.moments is not None

    def error_moments(self, clip_x0: bool = True) -> ErrorMoments | None:
        """A_t, B_t, C_t (length N+1; NaN at index 0 and where count is 0), E‖x₀‖²/d and the
        decoder term, for x̂₀ clipped to the data range (``clip_x0``) or not; None for format 1."""
        return None if self.moments is None else self.moments.error_moments(self.count, clip_x0)

    def missing_timesteps(self) -> np.ndarray:
        """The timesteps n (1..N) that have no samples."""
        return np.flatnonzero(self.count == 0) + 1

    def is_complete(self) -> bool:
        return bool(np.all(self.count > 0))

    def add(self, t: np.ndarray, values: np.ndarray, errors: dict | None = None, half=None) -> None:
        """Accumulate per-sample ‖ε‖²/d ``values`` observed at timesteps ``t`` (1..N), and, when the
        file keeps moments, the same pairs' :func:`~adpm_dist.gamma.moments.pair_errors` ``errors``;
        when it keeps halves, ``half`` (per pair: its sample id's parity, 0 = half A) says which."""
        if self.half is not None:
            if half is None:
                raise ValueError("this Γ file keeps the two halves' sums: add() needs each pair's half")
            rows = np.flatnonzero(np.asarray(half) == 0)
            self.half.add(_rows(t, rows), _rows(values, rows), {k: _rows(v, rows) for k, v in errors.items()}
                          if errors is not None else None)
        t = np.asarray(t, dtype=np.int64) - 1
        v = np.asarray(values, dtype=np.float64)
        if self.moments is not None:
            if errors is None:
                raise ValueError("this Γ file keeps the model-error moments: add() needs the pairs' errors")
            self.moments.add(t, errors)
        np.add.at(self.sum, t, v)
        np.add.at(self.sum_sq, t, v * v)
        np.add.at(self.count, t, 1)

    def all_reduce(self) -> GammaFile:
        """Sum every sum and count (Γ's and the moments') over every rank, in place (float64; a
        no-op alone). The one collective of the Γ job's rounds: afterwards every rank holds the
        totals. Counts travel as float64, exact up to 2**53. New arrays are assigned, never
        written into, so a shallow copy (``dataclasses.replace``) can be reduced."""
        import torch

        from adpm_dist.io import dist

        self.unpack(dist.all_reduce_sum(torch.from_numpy(self.pack())).numpy())
        return self

    def pack(self) -> np.ndarray:
        """Every sum and count (the moments' and half A's too) as one float64 vector."""
        parts = [self.sum, self.sum_sq, self.count.astype(np.float64)]
        parts += [self.moments.pack()] if self.moments is not None else []
        parts += [self.half.pack()] if self.half is not None else []
        return np.concatenate(parts)

    def unpack(self, flat: np.ndarray) -> None:
        """Set every sum from :meth:`pack`'s vector (new arrays and objects, never written into)."""
        n = self.sum.shape[0]
        self.sum, self.sum_sq = flat[:n].copy(), flat[n:2 * n].copy()
        self.count = np.rint(flat[2 * n:3 * n]).astype(np.int64)
        cut = 3 * n
        if self.moments is not None:
            cut += self.moments.pack().size
            self.moments = Moments.unpack(flat[3 * n:cut], n)
        if self.half is not None:
            half = dataclasses.replace(self.half)
            half.unpack(flat[cut:])
            self.half = half

    def halves(self) -> tuple[GammaFile, GammaFile] | None:
        """(half A, half B) as Γ files of their own (the schedule and model of this one), or None
        when the halves are unknown. B = total − A: sums that cannot be negative are clamped at 0
        (float rounding), counts are exact."""
        if self.half is None:
            return None
        a = self.half
        b_moments = Moments(self.moments.per_t - a.moments.per_t, self.moments.scalars - a.moments.scalars)
        signed = [PER_T.index(k) for k in SIGNED]
        keep = b_moments.per_t[signed, 0].copy()
        b_moments.per_t = np.maximum(b_moments.per_t, 0.0)
        b_moments.per_t[signed, 0] = keep
        b_moments.scalars = np.maximum(b_moments.scalars, 0.0)
        b = GammaFile(dict(self.schedule), dict(self.model), np.maximum(self.sum - a.sum, 0.0),
                      np.maximum(self.sum_sq - a.sum_sq, 0.0), self.count - a.count, data=dict(self.data),
                      moments=b_moments, source=f"{self.source or 'Γ file'} (half B)")
        half_a = dataclasses.replace(a, schedule=dict(self.schedule), model=dict(self.model), half=None,
                                     source=f"{self.source or 'Γ file'} (half A)")
        return half_a, b

    def to_dict(self) -> dict:
        mean, stderr = mean_stderr(self.sum, self.sum_sq, self.count)
        out = {"format": FORMAT if self.moments is not None else FORMAT_1, "schedule": self.schedule,
               "model": self.model, "data": self.data,
               "sum": self.sum.tolist(), "sum_sq": self.sum_sq.tolist(), "count": self.count.tolist(),
               "gamma": mean.tolist(), "stderr": stderr.tolist(), "contributions": self.contributions,
               "created": self.created or _now(), "adpm_dist_version": self.adpm_dist_version}
        if self.moments is not None:
            out["moments"] = self.moments.to_dict(self.count)
        if self.half is not None and self.moments is not None:
            out["format"] = FORMAT_3
            h = self.half
            out["halves"] = {"rule": HALF_RULE, "sum": h.sum.tolist(), "sum_sq": h.sum_sq.tolist(),
                             "count": h.count.tolist(), "moments": h.moments.to_dict(h.count)}
        if self.extra:
            out["extra"] = self.extra
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)


def _rows(v, rows: np.ndarray):
    """``v``'s entries at ``rows`` (NumPy arrays, lists, or tensors on any device)."""
    if hasattr(v, "index_select"):  # a torch tensor
        import torch

        return v.index_select(0, torch.as_tensor(rows, device=v.device))
    return np.asarray(v)[rows]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _per_t_arrays(obj: dict, n: int, fail, require_complete: bool) -> dict:
    """The validated float64 ``sum``, ``sum_sq`` and ``count`` of a parsed Γ file."""
    arrays = {key: finite_array(obj[key], key, n, fail) for key in ("sum", "sum_sq", "count")}
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


def _check_header(obj, fail) -> int:
    """Format, required fields, schedule and model; N."""
    if not isinstance(obj, dict):
        fail("not a JSON object")
    if obj.get("format") not in FORMATS:
        fail(f"format is {obj.get('format')!r}, expected one of {list(FORMATS)}")
    required = ("schedule", "model", "sum", "sum_sq", "count", "contributions")
    for key in required + {FORMAT: ("moments",), FORMAT_3: ("moments", "halves")}.get(obj["format"], ()):
        if key not in obj:
            fail(f"missing field '{key}' (format {obj['format']!r})" if key in ("moments", "halves")
                 else f"missing field '{key}'")
    sched = obj["schedule"]
    if not isinstance(sched, dict) or not {"name", "num_timesteps", "betas_sha256"} <= set(sched):
        fail("field 'schedule' needs name, num_timesteps and betas_sha256")
    if not isinstance(obj["model"], dict) or "digest" not in obj["model"]:
        fail("field 'model' needs a digest")
    n = sched["num_timesteps"]
    if not isinstance(n, int) or n < 1:
        fail(f"schedule.num_timesteps must be a positive integer, got {n!r}")
    return n


def from_dict(obj, source: str = "<Γ file>", require_complete: bool = True) -> GammaFile:
    """Validate a parsed Γ file and build a :class:`GammaFile`; errors name ``source`` and the field."""

    def fail(msg: str):
        raise GammaFileError(f"{source}: {msg}")

    n = _check_header(obj, fail)
    arrays = _per_t_arrays(obj, n, fail, require_complete)
    count = arrays["count"].astype(np.int64)
    moments = moments_from_dict(obj["moments"], count, fail) if obj["format"] != FORMAT_1 else None
    half = _half_from_dict(obj, count, fail) if obj["format"] == FORMAT_3 else None
    contributions = _contributions(obj["contributions"], fail)
    return GammaFile(dict(obj["schedule"]), dict(obj["model"]), arrays["sum"], arrays["sum_sq"], count,
                     data=dict(obj.get("data") or {}), contributions=list(contributions),
                     created=str(obj.get("created", "")),
                     adpm_dist_version=str(obj.get("adpm_dist_version", "")),
                     extra=dict(obj.get("extra") or {}), moments=moments, half=half, source=source)


def _half_from_dict(obj: dict, count: np.ndarray, fail) -> GammaFile:
    """Half A's sums (format 3), validated like the totals and against them (counts ≤ the file's)."""
    halves = obj["halves"]
    if not isinstance(halves, dict) or not {"sum", "sum_sq", "count", "moments"} <= set(halves):
        fail("field 'halves' must be an object with sum, sum_sq, count and moments")

    def fail_half(msg: str):
        fail(msg.replace("field '", "field 'halves.").replace("moments.", "halves.moments."))

    arrays = _per_t_arrays(halves, count.shape[0], fail_half, require_complete=False)
    half_count = arrays["count"].astype(np.int64)
    if np.any(half_count > count):
        fail("field 'halves.count' exceeds the file's 'count' (half A is part of the total)")
    moments = moments_from_dict(halves["moments"], half_count, fail_half)
    return GammaFile(dict(obj["schedule"]), dict(obj["model"]), arrays["sum"], arrays["sum_sq"], half_count,
                     moments=moments)


def loads(text: str, source: str = "<Γ file>", require_complete: bool = True) -> GammaFile:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GammaFileError(f"{source}: not valid JSON ({exc})") from None
    return from_dict(obj, source, require_complete)


def read_raw(url: str) -> tuple[bytes, str]:
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
    return loads(read_raw(url)[1], url, require_complete)


def write_gamma(gamma_file: GammaFile, url: str) -> None:
    """Write atomically: nothing half-written is ever visible under ``url``."""
    from adpm_dist.io import storage

    storage.write_text(url, gamma_file.to_json())
