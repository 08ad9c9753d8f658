"""Counter-based Gaussian noise: noise stream 2, one batched draw for a whole batch.

Row r of a draw is a pure function of (key_r, stream_r, element index): the noise of an
image (sampling: key = its seed, stream = the reverse step) or of a (sample id, t) pair (the
Γ job: key from the job seed and the id, stream = t) never depends on which batch, rank or
device drew it, nor on what else was drawn, so a batch of any composition is drawn at once
(a fixed number of elementwise kernels) instead of one generator call per image.

The integer part is SplitMix64's finaliser ``mix64`` (Steele, Lea & Flood, OOPSLA 2014) in
wrapping int64 arithmetic:

    a = mix64(key ⊕ mix64(stream + C₁)),  b = mix64(a ⊕ C₂),
    h_j = mix64(mix64(a + (j+1)·γ) ⊕ b)        (γ = 0x9E3779B97F4A7C15, j = element pair)

and the 64 bits of h_j become two standard normals by Box–Muller (Box & Muller, 1958):
u = (hi₃₂ + ½)/2³², θ = 2π·(lo₃₂ + ½)/2³² (the quadrant from lo's top two bits),
z = √(−2 ln u)·(cos θ, sin θ). ln, cos and sin are evaluated here from + − × ÷ √ and
``frexp`` alone (series below, error ≲ 1e-15), never by the library's transcendental kernels:
those differ between the vectorised and scalar paths of a CPU (so between batch sizes and
thread counts) and between CPU and GPU, while every operation used here is exactly rounded
by IEEE 754. So a row's float64 normals are the same bits on every batch size, thread count
and device; they are cast to the requested dtype at the end.

Noise stream 1 (per-image ``torch.Generator``s seeded with the image's seed) stays
available (``--noise-stream 1``) to reproduce outputs made before stream 2 existed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NOISE_STREAMS = (1, 2)
DEFAULT_NOISE_STREAM = 2
MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_C1, _C2 = 0xD1B54A32D192ED03, 0x8CB92BA72F3D8DD7
DOMAIN_SAMPLE = 0x5A3D_0001  # sampling's image seeds
DOMAIN_GAMMA = 0x5A3D_0002  # the Γ job's (seed, pair id) keys
_LN2 = math.log(2.0)
_SQRT_HALF = math.sqrt(0.5)
# ln m = 2·atanh(z), z = (m−1)/(m+1), |z| ≤ 0.172: 2z·Σ w^k/(2k+1), w = z², to k = 11 (w^12 < 1e-18)
_LOG = [2.0 / (2 * k + 1) for k in range(12)]
# sin φ = φ·Σ (−w)^k/(2k+1)!, cos φ = Σ (−w)^k/(2k)!, w = φ², φ in [0, π/2): to k = 12
_SIN = [(-1) ** k / math.factorial(2 * k + 1) for k in range(13)]
_COS = [(-1) ** k / math.factorial(2 * k) for k in range(13)]


def as_int64(value: int) -> int:
    """A Python int's low 64 bits as a signed int64 (two's complement)."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (a bijection of 64-bit words; wraps)."""
    z = (z ^ _shr(z, 30)) * as_int64(_M1)
    z = (z ^ _shr(z, 27)) * as_int64(_M2)
    return z ^ _shr(z, 31)


def _horner(w: torch.Tensor, coefs: list[float]) -> torch.Tensor:
    acc = w * coefs[-1]
    acc += coefs[-2]
    for c in reversed(coefs[:-2]):
        acc.mul_(w).add_(c)  # two exactly rounded operations (never a fused multiply-add)
    return acc


def _log(u: torch.Tensor) -> torch.Tensor:
    """ln u for float64 u > 0, from frexp and exactly rounded arithmetic."""
    m, e = torch.frexp(u)
    low = m < _SQRT_HALF
    lowf = low.to(torch.float64)
    m = m * (1.0 + lowf)  # ×2 or ×1: exact
    e = e.to(torch.float64) - lowf
    z = (m - 1.0) / (m + 1.0)
    return e * _LN2 + z * _horner(z * z, _LOG)


def _uniform_bits(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u in (0, 1), quadrant 0..3, φ in (0, π/2)) from a word's high and low 32 bits."""
    hi, lo = _shr(h, 32), h & 0xFFFFFFFF
    u = (hi.to(torch.float64) + 0.5) * 2.0 ** -32
    quadrant = lo >> 30
    phi = ((lo & 0x3FFFFFFF).to(torch.float64) + 0.5) * (2.0 ** -30 * (math.pi / 2))
    return u, quadrant, phi


def normals_from_bits(h: torch.Tensor) -> torch.Tensor:
    """Two standard normals per int64 word (Box–Muller): shape (…, 2), float64."""
    u, quadrant, phi = _uniform_bits(h)
    r = torch.sqrt(-2.0 * _log(u))
    w = phi * phi
    s, c = phi * _horner(w, _SIN), _horner(w, _COS)
    # θ = quadrant·π/2 + φ: swap (odd quadrants) by 0/1 weights and flip signs by ±1 factors,
    # all exact (x·1 + y·0 = x), so no data-dependent branch or select kernel
    odd = (quadrant & 1).to(torch.float64)
    even = 1.0 - odd
    cos_t = c * even + s * odd
    sin_t = s * even + c * odd
    cos_t *= 1.0 - 2.0 * ((quadrant ^ (quadrant >> 1)) & 1).to(torch.float64)  # − in quadrants 1, 2
    sin_t *= 1.0 - 2.0 * (quadrant >> 1).to(torch.float64)  # − in quadrants 2, 3
    return torch.stack((r * cos_t, r * sin_t), dim=-1)


def row_words(keys: torch.Tensor, streams: torch.Tensor, pairs: int) -> torch.Tensor:
    """The (R, pairs) int64 words h_j of rows (keys, streams) (module doc)."""
    a = mix64(keys ^ mix64(streams + as_int64(_C1)))
    b = mix64(a ^ as_int64(_C2))
    j = (torch.arange(1, pairs + 1, device=keys.device, dtype=torch.int64) * as_int64(GOLDEN))
    return mix64(mix64(a[:, None] + j[None, :]) ^ b[:, None])


def counter_normal(keys, streams, shape: Sequence[int], dtype=torch.float32, device="cpu") -> torch.Tensor:
    """(R, *shape) standard normals; row r a function of (keys[r], streams[r]) alone.

    ``keys``/``streams``: int64 tensors or int sequences of length R (a single stream int is
    broadcast). Computed on ``device`` in float64, then cast to ``dtype``.
    """
    device = torch.device(device)
    keys = torch.as_tensor(keys, dtype=torch.int64).to(device, non_blocking=True)
    streams = torch.as_tensor(streams, dtype=torch.int64).to(device, non_blocking=True)
    streams = streams.expand(keys.shape[0]) if streams.dim() == 0 else streams
    numel = math.prod(shape)
    words = row_words(keys, streams, (numel + 1) // 2)
    z = normals_from_bits(words).reshape(keys.shape[0], -1)[:, :numel]
    return z.reshape(keys.shape[0], *shape).to(dtype)


def image_keys(seeds: Sequence[int]) -> torch.Tensor:
    """Sampling's row keys: mix64(mix64(DOMAIN_SAMPLE) ⊕ mix64(seed)) per image seed (int64)."""
    s = torch.tensor([as_int64(int(x)) for x in seeds], dtype=torch.int64)
    return mix64(mix64(torch.tensor(DOMAIN_SAMPLE, dtype=torch.int64)) ^ mix64(s))


def pair_keys(seed: int, ids: torch.Tensor) -> torch.Tensor:
    """The Γ job's row keys: mix64(mix64(seed ⊕ DOMAIN_GAMMA) ⊕ mix64(pair id)), on ids' device."""
    job = mix64(torch.tensor(as_int64(int(seed) ^ DOMAIN_GAMMA), dtype=torch.int64, device=ids.device))
    return mix64(job ^ mix64(ids.to(torch.int64)))


class CounterNoise:
    """Noise stream 2 for a batch of images: ``normal(shape, dtype, device, step)`` draws row i
    from (image i's seed, step) alone (step 0: x_N; step k: the k-th reverse step's noise)."""

    stream = 2

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self.keys = image_keys(self.seeds)

    def __len__(self) -> int:
        return len(self.seeds)

    def normal(self, shape, dtype, device, step: int) -> torch.Tensor:
        return counter_normal(self.keys, int(step), tuple(shape), dtype, device)


__all__ = ["DEFAULT_NOISE_STREAM", "NOISE_STREAMS", "CounterNoise", "counter_normal", "image_keys", "mix64",
           "pair_keys"]
