"""The model-error moments of a Γ file (format "adpm-gamma/2"): define, accumulate, store, read.

Per evaluated (sample, t) pair, with ε the forward noise, ε̂ = ε_θ(x_t, t) the network output,
x̂₀ = (x_t − √β̄_t ε̂)/√ᾱ_t and x̂₀ᶜ = clamp(x̂₀, −1, 1) (the data range), per dimension:

    a = ‖x₀ − x̂₀ᶜ‖²/d,  a_raw = ‖x₀ − x̂₀‖²/d,  b = ⟨x₀ − x̂₀ᶜ, ε − ε̂⟩/d,
    b_raw = ⟨x₀ − x̂₀, ε − ε̂⟩/d,  c = ‖ε − ε̂‖²/d.

Each is kept per timestep as (Σv, Σv²) in float64; the count is the Γ file's own (the same
pairs), so they merge and all-reduce exactly like Γ. A_t, B_t, C_t are their means
(:class:`~adpm_dist.diffusion.residual.ErrorMoments` is what the maths consumes). Three scalar
statistics carry (Σv, Σv², count) each: ``x0_sq`` = ‖x₀‖²/d over every pair (any t), and
``decoder_nll`` / ``decoder_nll_raw`` = −log p(x₀|x₁)/d over the pairs at t = 1, for the
discretised-Gaussian decoder of :mod:`adpm_dist.diffusion.likelihood` with mean x̂₀ᶜ / x̂₀ and
variance β̄_1 (1 − ᾱ_2/ᾱ_1)/β̄_2 (as ``negative_elbos``). ``b_raw`` is not in the brief's list
but is what a DDIM mean with unclipped x̂₀ needs (there B_raw = −√(β̄_t/ᾱ_t) C_t exactly).

x̂₀ is computed as x₀ + √(β̄_t/ᾱ_t)(ε − ε̂): the same number in exact arithmetic, without the
cancellation of x_t/√ᾱ_t at large t, and from the exact x_t rather than the (float32) copy
the network saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from adpm_dist.diffusion.residual import ErrorMoments
from adpm_dist.diffusion.stats import mean_stderr

PER_T = ("a", "a_raw", "b", "b_raw", "c")
SCALARS = ("x0_sq", "decoder_nll", "decoder_nll_raw")
SIGNED = ("b", "b_raw")  # the others are squared norms or −log probabilities: never negative
DATA_RANGE = (-1.0, 1.0)


def finite_array(val, name: str, n: int | None, fail) -> np.ndarray:
    """``val`` as a float64 array: a list of length ``n`` (None: a single number), all finite."""
    if n is None:
        ok = isinstance(val, (int, float)) and not isinstance(val, bool)
        if not ok or not math.isfinite(val):
            fail(f"field '{name}' must be a finite number, got {val!r}")
        return np.float64(val)
    if not isinstance(val, list) or len(val) != n:
        got = len(val) if isinstance(val, list) else type(val).__name__
        fail(f"field '{name}' must be a list of length N={n}, got {got}")
    try:
        arr = np.asarray(val, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,):
        fail(f"field '{name}' holds non-numbers")
    if not np.all(np.isfinite(arr)):
        bad = (np.flatnonzero(~np.isfinite(arr))[:5] + 1).tolist()
        fail(f"field '{name}' is not finite at n = {bad}")
    return arr


def decoder_variance(schedule) -> float:
    """The decoder's variance β̄_1 (1 − ᾱ_2/ᾱ_1)/β̄_2, as ``likelihood.negative_elbos`` has it."""
    abar, bbar = schedule.alphas_cumprod, schedule.bar_betas
    return float(bbar[1] * (1.0 - abar[2] / abar[1]) / bbar[2])


def pair_errors(schedule, x0, t, noise, eps) -> dict[str, np.ndarray]:
    """The per-pair statistics (module doc) of a forward batch, float64 NumPy arrays of its length.

    ``x0``, ``noise``, ``eps`` (ε̂) are tensors shaped (B, …), ``t`` the timesteps (1..N).
    ``decoder_nll*`` are NaN except at t = 1. (:func:`pair_errors_device` without the copy.)
    """
    out = pair_errors_device(schedule, x0, t, noise, eps, t.cpu().numpy())
    return {k: v.cpu().numpy() for k, v in out.items()}


_RATIO: dict = {}  # (schedule's ᾱ bytes, device) → √(β̄_t/ᾱ_t) for t = 0..N, float64 on the device


def _ratio_table(schedule, device):
    import torch

    abar = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
    key = (abar.tobytes(), str(device))
    if key not in _RATIO:
        _RATIO.clear()  # one schedule at a time is all a job uses
        _RATIO[key] = torch.from_numpy(np.sqrt((1.0 - abar) / abar)).to(device, non_blocking=True)
    return _RATIO[key]


def pair_errors_device(schedule, x0, t, noise, eps, t_host: np.ndarray) -> dict:
    """:func:`pair_errors` as float64 tensors on x0's device, without a device→host copy.

    ``t_host``: the same timesteps on the host (NumPy), for the host-side choice of the rows at
    t = 1 (the decoder term); ``t`` itself stays on the device. The numbers are those of
    :func:`pair_errors` bit for bit (same operations, same order).
    """
    import torch

    from adpm_dist.diffusion.likelihood import log_discretized_gaussian

    size = x0.shape[0]
    x0 = x0.reshape(size, -1).double()
    e = noise.reshape(size, -1).double() - eps.reshape(size, -1).double()  # ε − ε̂
    d = x0.shape[1]
    r = _ratio_table(schedule, x0.device)[t.to(x0.device)][:, None]
    raw = x0 + r * e  # x̂₀
    clamped = raw.clamp(*DATA_RANGE)
    delta, delta_raw = x0 - clamped, x0 - raw
    per_dim = {"a": delta.pow(2), "a_raw": delta_raw.pow(2), "b": delta * e, "b_raw": delta_raw * e,
               "c": e.pow(2), "x0_sq": x0.pow(2)}
    out = {k: v.sum(dim=1) / d for k, v in per_dim.items()}
    rows = np.flatnonzero(np.asarray(t_host) == 1)
    if rows.size:  # an index on the device, copied without a stream sync
        idx = torch.from_numpy(rows).to(x0.device, non_blocking=True)
    for key, mean in (("decoder_nll", clamped), ("decoder_nll_raw", raw)):
        out[key] = torch_full_nan(size, x0)
        if rows.size:  # (schedules have N >= 10: ᾱ_2 exists)
            x0_1, mean_1 = x0.index_select(0, idx), mean.index_select(0, idx)
            nll = -log_discretized_gaussian(x0_1, mean_1, decoder_variance(schedule)) / d
            out[key].index_copy_(0, idx, nll)
    return out


def torch_full_nan(size: int, like):
    """A length-``size`` float64 NaN tensor on ``like``'s device."""
    return like.new_full((size,), float("nan"))


@dataclass
class Moments:
    """Sums of a Γ file's model-error statistics (module doc).

    ``per_t[i]`` = (Σv, Σv²) per timestep of ``PER_T[i]`` (shape (5, 2, N); counts: the Γ file's);
    ``scalars[i]`` = (Σv, Σv², count) of ``SCALARS[i]`` (shape (3, 3)).
    """

    per_t: np.ndarray
    scalars: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> Moments:
        return cls(np.zeros((len(PER_T), 2, n)), np.zeros((len(SCALARS), 3)))

    def add(self, idx: np.ndarray, errors: dict) -> None:
        """Accumulate :func:`pair_errors` ``errors`` of pairs at 0-based timestep indices ``idx``."""
        for i, key in enumerate(PER_T):
            v = np.asarray(errors[key], dtype=np.float64)
            np.add.at(self.per_t[i, 0], idx, v)
            np.add.at(self.per_t[i, 1], idx, v * v)
        first = idx == 0
        for i, key in enumerate(SCALARS):
            v = np.asarray(errors[key], dtype=np.float64)
            v = v if key == "x0_sq" else v[first]
            self.scalars[i] += (v.sum(), (v * v).sum(), v.size)

    def pack(self) -> np.ndarray:
        """Every sum as one float64 vector (for the one all-reduce; counts exact up to 2**53)."""
        return np.concatenate([self.per_t.ravel(), self.scalars.ravel()])

    @classmethod
    def unpack(cls, flat, n: int) -> Moments:
        flat = np.asarray(flat, dtype=np.float64)
        if flat.shape != (len(PER_T) * 2 * n + len(SCALARS) * 3,):
            raise ValueError(f"model-error moments must hold {len(PER_T) * 2 * n + 9} numbers for N={n}")
        cut = len(PER_T) * 2 * n
        scalars = flat[cut:].reshape(len(SCALARS), 3).copy()
        scalars[:, 2] = np.rint(scalars[:, 2])
        return cls(flat[:cut].reshape(len(PER_T), 2, n).copy(), scalars)

    @staticmethod
    def total(parts: list[Moments]) -> Moments:
        return Moments(np.sum([p.per_t for p in parts], axis=0), np.sum([p.scalars for p in parts], axis=0))

    def to_dict(self, count: np.ndarray) -> dict:
        """JSON: per statistic its sums, and (derived, ignored on reading) mean and stderr."""
        out = {}
        for i, key in enumerate(PER_T):
            mean, se = mean_stderr(self.per_t[i, 0], self.per_t[i, 1], count)
            out[key] = {"sum": self.per_t[i, 0].tolist(), "sum_sq": self.per_t[i, 1].tolist(),
                        "mean": mean.tolist(), "stderr": se.tolist()}
        for i, key in enumerate(SCALARS):
            s, sq, n = self.scalars[i]
            mean, se = mean_stderr(s, sq, n)
            out[key] = {"sum": float(s), "sum_sq": float(sq), "count": int(n), "mean": float(mean),
                        "stderr": float(se)}
        return out

    def error_moments(self, count: np.ndarray, clip_x0: bool = True) -> ErrorMoments:
        """Means as :class:`ErrorMoments` (length N+1, index 0 and timesteps without pairs NaN)."""
        missing = np.concatenate([[True], count == 0])

        def per_t(key: str) -> tuple[np.ndarray, np.ndarray]:
            i = PER_T.index(key)
            mean, se = mean_stderr(self.per_t[i, 0], self.per_t[i, 1], count)
            return tuple(np.where(missing, np.nan, np.concatenate([[0.0], v])) for v in (mean, se))

        def scalar(key: str) -> tuple[float, float]:
            s, sq, n = self.scalars[SCALARS.index(key)]
            return (math.nan, math.nan) if n == 0 else tuple(float(v) for v in mean_stderr(s, sq, n))

        raw = "" if clip_x0 else "_raw"
        a, a_se = per_t("a" + raw)
        x0_sq, x0_se = scalar("x0_sq")
        dec, dec_se = scalar("decoder_nll" + raw)
        return ErrorMoments(a=a, b=per_t("b" + raw)[0], c=per_t("c")[0], x0_sq=x0_sq, decoder_nll=dec,
                            a_stderr=a_se, x0_sq_stderr=x0_se, decoder_nll_stderr=dec_se)


def expected_counts(count: np.ndarray) -> dict[str, int]:
    """The count each scalar statistic must have: every pair for x0_sq, the pairs at t = 1 for the decoder."""
    return {"x0_sq": int(count.sum()), "decoder_nll": int(count[0]), "decoder_nll_raw": int(count[0])}


def _entry(obj: dict, key: str, fail) -> dict:
    entry = obj.get(key)
    if not isinstance(entry, dict):
        fail(f"field 'moments.{key}' is missing or not an object")
    return entry


def moments_from_dict(obj, count: np.ndarray, fail) -> Moments:
    """Validate a file's ``moments`` object against its counts; errors name the field."""
    if not isinstance(obj, dict):
        fail("field 'moments' must be an object")
    n = count.shape[0]
    m = Moments.zeros(n)
    for i, key in enumerate(PER_T):
        entry = _entry(obj, key, fail)
        for j, part in enumerate(("sum", "sum_sq")):
            m.per_t[i, j] = finite_array(entry.get(part), f"moments.{key}.{part}", n, fail)
        if np.any(m.per_t[i, 1] < 0) or (key not in SIGNED and np.any(m.per_t[i, 0] < 0)):
            fail(f"field 'moments.{key}' has negative sums (they are sums of squares)")
    want = expected_counts(count)
    for i, key in enumerate(SCALARS):
        entry = _entry(obj, key, fail)
        m.scalars[i] = [finite_array(entry.get(p), f"moments.{key}.{p}", None, fail)
                        for p in ("sum", "sum_sq", "count")]
        if m.scalars[i, 2] != want[key]:
            fail(f"field 'moments.{key}.count' is {entry.get('count')!r}, but the file's 'count' gives "
                 f"{want[key]} (every pair for x0_sq, the pairs at t = 1 for the decoder)")
        if m.scalars[i, 1] < 0 or m.scalars[i, 0] < 0:
            fail(f"field 'moments.{key}' has a negative sum")
    return m
