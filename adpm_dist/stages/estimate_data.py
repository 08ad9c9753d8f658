"""What the Γ job reads: the data's identity, and which pair-sample ids it evaluates.

Sample ids are the manifest's (shard offset + index), whichever shards of the split
``--data`` lists. Pass p over the data gives sample id i the pair-sample id j = i + p·S,
with S the size of the whole split, so pair ids never collide between passes, nor between
runs over different parts of one split. The n samples present are taken in id order: in
pass p the sample at position k (0-based among the present ids) is the (p·n + k)-th, and
it is kept while that is below M (``--samples-per-t``). For a whole split that is j < M.

The data's identity is what the draws depend on besides seed, ids and timesteps: the
manifest's content digest and the split — not how or where ``--data`` was spelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from adpm_dist.errors import UsageError
from adpm_dist.io import storage
from adpm_dist.io.quality import DataSummary


@dataclass(frozen=True)
class DataPlan:
    """The shards of ``--data`` as the Γ job sees them (from their manifest)."""

    spec: object  # --data as given
    split: str
    split_total: int  # S: ids of the split lie in [0, S)
    manifest_sha256: str
    manifest_url: str
    offsets: np.ndarray  # first id of each listed shard, sorted
    counts: np.ndarray  # samples of each, in the same order

    @property
    def present(self) -> int:
        """n: the samples the listed shards hold."""
        return int(self.counts.sum())

    def identity(self) -> dict:
        """What the draws depend on besides seed, sample ids and timesteps (recorded per contribution)."""
        return {"manifest_sha256": self.manifest_sha256, "split": self.split}

    def ranges(self) -> list[list[int]]:
        """The present ids as half-open ranges [[start, end), …]."""
        out: list[list[int]] = []
        for lo, n in zip(self.offsets.tolist(), self.counts.tolist()):
            if out and out[-1][1] == lo:
                out[-1][1] = lo + n
            elif n:
                out.append([lo, lo + n])
        return out

    def key(self) -> dict:
        """The data part of the job's fingerprint: its identity and which of its samples are present."""
        return {**self.identity(), "samples": self.ranges()}

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Position of each present id among all present ids, in id order."""
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        starts = np.cumsum(self.counts) - self.counts
        return starts[shard] + ids - self.offsets[shard]

    def old_rule_agrees(self, per_t: int) -> bool:
        """Did the rule before this one (pair id j = i + p·n_max, keep j < M, n_max = the listed
        shards' largest end) pick the same pairs? Only for ids 0..n−1 in one pass, or a whole split."""
        n = self.present
        return self.ranges() == [[0, n]] and (per_t <= n or n == self.split_total)

    def describe(self) -> str:
        spans = ", ".join(f"{a}..{b - 1}" for a, b in self.ranges()[:4])
        return f"{self.present} samples (ids {spans} of split {self.split!r} in {self.manifest_url})"


def data_plan(spec) -> DataPlan:
    """The plan for ``--data`` ``spec``: one manifest and split (else a UsageError naming them)."""
    from adpm_dist.io.data import eval_batches

    shards = eval_batches(spec, batch_size=1, rank=0, world_size=1, num_workers=0).dataset.shards
    shards = sorted(shards, key=lambda s: s.offset)
    first = shards[0]
    plan = DataPlan(spec, first.split, int(first.split_total), first.manifest_sha256,
                    storage.redact(storage.canonical(first.manifest_url)),
                    np.array([s.offset for s in shards], dtype=np.int64),
                    np.array([s.count for s in shards], dtype=np.int64))
    if plan.present == 0:
        raise UsageError(f"--data {storage.redact(str(spec))!r}: the manifest lists no samples in them")
    return plan


def work_units(plan: DataPlan, args, rank: int, world: int, per_t: int, data_batch: int,
               summary: DataSummary, skip: np.ndarray):
    """This rank's (pair-sample ids, x₀) batches over ceil(M/n) passes (module doc), without the
    pair ids in ``skip`` (sorted: those already in the reloaded sums). Bad-input counts go to
    ``summary`` as each pass ends."""
    from adpm_dist.io.data import eval_batches

    n = plan.present
    for p in range(math.ceil(per_t / n)):
        stream = eval_batches(args.data, batch_size=data_batch, rank=rank, world_size=world,
                              num_workers=args.num_workers, max_bad_fraction=args.max_bad_fraction,
                              setting="--max-bad-fraction")
        for ids, x in stream:
            j = ids.numpy() + p * plan.split_total
            keep = p * n + plan.positions(ids.numpy()) < per_t
            if skip.size:
                keep &= ~np.isin(j, skip, assume_unique=True)
            if keep.any():
                mask = torch.from_numpy(keep)
                yield torch.from_numpy(j[keep]), x[mask]
        summary.merge(stream.summary)
