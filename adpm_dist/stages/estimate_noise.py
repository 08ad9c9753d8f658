"""The Γ job's noise: pair (sample id, t) → its standard normal draw, two versions.

Stream 2 (the default): one counter-based draw per block of pairs
(:func:`adpm_dist.diffusion.noise.counter_normal`), row (id, t) a function of (seed, id, t) alone.
Stream 1 (``--noise-stream 1``, Γ files made before 2026-12): a ``torch.Generator`` per
(seed, sample id, block of 16 timesteps), seeded through BLAKE2b.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from adpm_dist.diffusion.noise import counter_normal, pair_keys
from adpm_dist.stages.estimate_args import id_ranges

NOISE_BLOCK = 16  # timesteps per noise generator: noise depends on (seed, id, t) only


def _seed_for(seed: int, sample_id: int, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{sample_id}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def partial_draw_exact(shape, device) -> bool:
    """Can single rows of a block's 16-row draw be drawn alone, bit for bit?

    True on CPU when a row holds a multiple of 16 numbers: torch's CPU ``randn`` takes one
    float32 uniform per number, in order, then transforms them 16 at a time; so rows a..b
    drawn after consuming rows 0..a−1's uniforms (float32 ``uniform_``) equal the full draw's.
    """
    return torch.device(device).type == "cpu" and math.prod(shape) % 16 == 0


def _runs(offsets: list[int]) -> list[tuple[int, int]]:
    """Sorted offsets → contiguous runs [(first, length), …]."""
    return [(a, b - a) for a, b in id_ranges(offsets)]


def pair_noise(seed: int, sample_id: int, block: int, shape, device, offsets=None) -> torch.Tensor:
    """Rows ``offsets`` (sorted, unique; default all 16) of one sample's noise block.

    The block covers timesteps 16·block+1 … 16·(block+1); its values never depend on which
    rows are asked for: only those are drawn when exact (:func:`partial_draw_exact`).
    """
    g = torch.Generator(device=device)
    g.manual_seed(_seed_for(seed, sample_id, block))
    offsets = list(range(NOISE_BLOCK)) if offsets is None else [int(o) for o in offsets]
    ordered = bool(offsets) and offsets == sorted(set(offsets)) and 0 <= offsets[0] < NOISE_BLOCK
    ordered = ordered and offsets[-1] < NOISE_BLOCK
    if not (ordered and partial_draw_exact(shape, device)):
        return torch.randn((NOISE_BLOCK, *shape), generator=g, device=device)[offsets]
    numel, pos, parts = math.prod(shape), 0, []
    for first, length in _runs(offsets):
        if first > pos:  # consume the skipped rows' uniforms, as randn would have
            torch.empty((first - pos) * numel).uniform_(generator=g)
        parts.append(torch.randn((length, *shape), generator=g))
        pos = first + length
    return torch.cat(parts)


def block_noise(ids: torch.Tensor, ts: np.ndarray, block: int, seed: int, shape, dtype, device,
                stream: int) -> torch.Tensor:
    """The noise of pairs (id, t) for ids × ts (id-major), ts within one 16-timestep block.

    Stream 2: one batched counter-based draw (:func:`~adpm_dist.diffusion.noise.counter_normal`),
    row (id, t) a function of (seed, id, t) alone. Stream 1: a generator per (id, block),
    :func:`pair_noise`.
    """
    if stream == 2:
        keys = pair_keys(seed, ids.to(device, non_blocking=True)).repeat_interleave(len(ts))
        streams = torch.from_numpy(np.tile(ts, len(ids))).to(device, non_blocking=True)
        return counter_normal(keys, streams, shape, dtype, device)
    offsets = (ts - 1 - NOISE_BLOCK * block).tolist()
    noise = torch.stack([pair_noise(seed, int(i), int(block), shape, device, offsets) for i in ids])
    return noise.reshape(-1, *shape)
