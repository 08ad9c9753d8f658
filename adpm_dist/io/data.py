"""Streaming WebDataset shard sets (:mod:`adpm_dist.io.shards`) to every rank.

Two streams, on webdataset's own stages (tar iteration and grouping in
:mod:`adpm_dist.io.shard_reader`; ``ResampledShards`` and ``shuffle`` here):

- :class:`TrainStream` — shards drawn with replacement by webdataset's ``ResampledShards``
  and webdataset's shuffle buffer, both with RNGs we seed from (seed, epoch, rank, worker),
  and optional horizontal flips. Every rank yields exactly ``batches_per_epoch`` batches,
  so data-parallel training never hangs on uneven data, and re-creating epoch ``e`` gives
  the same batches (exact mid-epoch resume: skip the batches done).
- :func:`eval_batches` — every sample exactly once across all ranks and DataLoader workers,
  each with its global id (manifest offset + index in shard). The split is by sample
  ranges, not whole shards (webdataset's ``split_by_node``/``split_by_worker`` hand out
  whole shards: with fewer shards than ranks × workers, or unequal shards, they leave
  consumers empty or uneven), so it works with more ranks × workers than shards.

8-bit convention: pixels v ∈ {0..255} decode to x = v/127.5 − 1, so values lie on the
256-level grid in [−1, 1] (the discretised likelihood relies on it).

Bad input (truncated tar, undecodable image, wrong size, missing field) is skipped, counted
by kind in a :class:`DataSummary` (:mod:`adpm_dist.io.quality`), warned once per file,
and summarised at the end; above ``max_bad_fraction`` the stream stops with
:class:`BadDataError`, whose message names the setting that raises the limit (``setting``:
``data.max_bad_fraction`` for training, the stage's flag for evaluation) and the value that
would accept what was seen so far.

Reading and decoding shards is :mod:`adpm_dist.io.shard_reader`. Importing this module
(through it) registers an ``s3://`` opener in ``webdataset.gopen.gopen_schemes``
(at import time, so DataLoader workers started with spawn get it too).

DataLoader workers (:mod:`adpm_dist.io.workers`): the training stream keeps its workers
across epochs (``persistent_workers``; each worker counts the epochs it is asked for, and
every batch carries its epoch, checked in the main process); pinned batches on CUDA; and a
``forkserver`` start when the shards are remote or fsspec's event loop runs in this process.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle
from webdataset.shardlists import ResampledShards

from adpm_dist.io import backend
from adpm_dist.io.quality import BadDataError, DataSummary

# Reading shards lives in shard_reader (which registers the s3:// opener on import).
from adpm_dist.io.shard_reader import _iter_tar_groups, _open_shard, _ShardReader, to_tensor
from adpm_dist.io.shards import ShardInfo, ShardSetError, expand_urls, shard_table
from adpm_dist.io.workers import loader as _loader

log = logging.getLogger(__name__)

__all__ = ["EvalBatches", "TrainStream", "consumer_range", "eval_batches", "shard_draws", "to_tensor",
           "_iter_tar_groups", "_open_shard"]


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ============================================================================ training stream


class _TrainEpoch(IterableDataset):
    """One epoch of one rank; each DataLoader worker yields its share of the batches."""

    def __init__(self, stream: TrainStream, epoch: int):
        super().__init__()
        self.s = stream
        self.epoch = epoch
        self.iters = 0  # a persistent worker is asked once per epoch, in order: epoch + iters

    def worker_batches(self, worker: int, num_workers: int) -> int:
        n = self.s.batches_per_epoch
        return n // num_workers + (1 if worker < n % num_workers else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict, int]]:
        worker, num_workers = _worker()
        epoch = self.epoch + self.iters
        self.iters += 1
        return self.iter_worker(worker, num_workers, epoch)

    def iter_worker(self, worker: int, num_workers: int,
                    epoch: int | None = None) -> Iterator[tuple[torch.Tensor, dict, int]]:
        """(batch, bad-input counts, epoch) of one worker in one epoch (default: ``self.epoch``)."""
        s = self.s
        epoch = self.epoch if epoch is None else epoch
        n_batches = self.worker_batches(worker, num_workers)
        if n_batches == 0:
            return
        _, shuffle_seed, flip_seed = _worker_seeds(s.seed, epoch, s.rank, worker)
        reader = _ShardReader(s.resolution, s.channels)
        flip_rng = np.random.default_rng(flip_seed)
        draws = shard_draws([shard.url for shard in s.shards], s.seed, epoch, s.rank, worker)
        with contextlib.closing(self._resampled(draws, reader)) as samples:
            # webdataset's shuffle buffer, filled completely before the first draw.
            buffer = wds_shuffle(s.shuffle_buffer, s.shuffle_buffer, rng=random.Random(shuffle_seed))
            shuffled = buffer(samples)
            batch: list[torch.Tensor] = []
            done = 0
            for arr in shuffled:
                x = to_tensor(arr)
                if s.hflip and flip_rng.random() < 0.5:
                    x = x.flip(-1)
                batch.append(x)
                if len(batch) == s.batch_size:
                    yield torch.stack(batch), reader.take_summary(), epoch
                    batch = []
                    done += 1
                    if done == n_batches:
                        return

    def _resampled(self, draws: Iterator[str], reader: _ShardReader) -> Iterator[np.ndarray]:
        """Endless samples from the shards drawn; fails if nothing decodes."""
        shards = self.s.shards
        by_url = {shard.url: shard for shard in shards}
        fruitless = 0
        for url in draws:
            shard = by_url[url]
            produced = 0
            for _i, arr in reader.read(shard):
                produced += 1
                yield arr
            fruitless = 0 if produced else fruitless + 1
            if fruitless > 2 * len(shards) + 8:
                raise BadDataError(
                    f"no decodable samples after reading {fruitless} shards: {reader.summary.report()}"
                )


def _worker_seeds(seed: int, epoch: int, rank: int, worker: int) -> tuple[int, int, int]:
    """Independent seeds for the shard draws, the shuffle buffer and the flips of one
    DataLoader worker: the same four numbers, the same batches."""
    return tuple(int(x) for x in np.random.SeedSequence([seed, epoch, rank, worker]).generate_state(3))


def shard_draws(urls: Sequence[str], seed: int, epoch: int, rank: int, worker: int) -> Iterator[str]:
    """The shards a DataLoader worker of a rank reads in an epoch, in order and without end:
    webdataset's ``ResampledShards`` (draws with replacement) with our seed."""
    shard_seed = _worker_seeds(seed, epoch, rank, worker)[0]
    for draw in ResampledShards(list(urls), worker_seed=lambda: shard_seed, deterministic=True):
        yield draw["url"]


class TrainStream:
    """Endless-data training batches: exactly ``batches_per_epoch`` per rank per epoch.

    Batches are float32 (batch_size, C, H, W) in [−1, 1]. The same (seed, epoch, rank,
    world_size, num_workers) always gives the same batches, so a resumed run re-creates
    epoch ``e`` and skips the batches it has done. Shards are drawn with replacement, so
    ranks never run out and never need the same number of shards.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        batch_size: int,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
        batches_per_epoch: int,
        num_workers: int = 2,
        resolution: int | None = None,
        channels: int | None = None,
        hflip: bool = False,
        shuffle_buffer: int = 1000,
        max_bad_fraction: float = 0.01,
        setting: str = "data.max_bad_fraction",
    ):
        from adpm_dist.io import dist

        info = dist.env_info()
        self.rank = info.rank if rank is None else int(rank)
        self.world_size = info.world_size if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if batch_size < 1 or batches_per_epoch < 1 or shuffle_buffer < 1:
            raise ValueError("batch_size, batches_per_epoch and shuffle_buffer must be >= 1")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.urls = expand_urls(urls)
        self.shards, fmt = shard_table(self.urls, require_manifest=False)
        self.resolution = _agree("resolution", resolution, fmt["resolution"], self.urls[0])
        self.channels = channels if channels is not None else fmt["channels"]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.batches_per_epoch = int(batches_per_epoch)
        self.num_workers = int(num_workers)
        self.hflip = bool(hflip)
        self.shuffle_buffer = int(shuffle_buffer)
        self.max_bad_fraction = float(max_bad_fraction)
        self.setting = setting
        self.summary = DataSummary()  # accumulated over all epochs of this rank
        self._loader: DataLoader | None = None  # persistent workers, at epoch self._next_epoch
        self._next_epoch = -1

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __getstate__(self) -> dict:
        """What a worker gets: everything but the loader (and its worker processes)."""
        return {**self.__dict__, "_loader": None, "_next_epoch": -1}

    def close(self) -> None:
        """Stop the DataLoader workers (they also stop when the stream is garbage collected)."""
        self._loader, self._next_epoch = None, -1

    def _batches(self, e: int) -> Iterable[tuple[torch.Tensor, dict, int]]:
        """Epoch ``e`` from the persistent workers when they are at ``e`` (the next epoch after
        the last one asked for), else from new workers that start at ``e``."""
        if self.num_workers <= 0:
            return iter(_TrainEpoch(self, e))
        if self._loader is None or self._next_epoch != e:
            self.close()
            remote = any(backend.is_remote(u) for u in self.urls)
            self._loader = _loader(_TrainEpoch(self, e), self.num_workers, remote=remote,
                                   persistent=True)
        self._next_epoch = e + 1
        return self._loader

    def epoch(self, e: int) -> Iterator[torch.Tensor]:
        """The batches of epoch ``e`` for this rank (a fresh, reproducible pass)."""
        e = int(e)
        produced = 0
        for batch, delta, got in self._batches(e):
            if got != e:  # a persistent worker out of step would silently repeat data
                self.close()
                raise RuntimeError(f"training stream: a worker sent epoch {got} during epoch {e}")
            self.summary.merge(delta)
            self.summary.check(self.max_bad_fraction, min_seen=_MIN_SEEN_FOR_EARLY_STOP, setting=self.setting)
            produced += 1
            yield batch
        if produced != self.batches_per_epoch:  # a worker died quietly: never hand out less
            raise RuntimeError(f"epoch {e} produced {produced} batches, expected {self.batches_per_epoch}")
        _finish(self.summary, self.max_bad_fraction, f"train epoch {e} rank {self.rank}", self.setting)


# ============================================================================ evaluation stream


def consumer_range(total: int, consumer: int, n_consumers: int) -> tuple[int, int]:
    """Contiguous, disjoint, covering slice [lo, hi) of ``total`` items for one consumer."""
    return total * consumer // n_consumers, total * (consumer + 1) // n_consumers


class _EvalPass(IterableDataset):
    """The samples of one rank, split by contiguous sample ranges across workers."""

    def __init__(self, shards: list[ShardInfo], fmt: dict, batch_size: int, rank: int, world_size: int):
        super().__init__()
        self.shards = shards
        self.fmt = fmt
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        worker, num_workers = _worker()
        return self.iter_worker(worker, num_workers)

    def iter_worker(self, worker: int, num_workers: int):
        consumer = self.rank * num_workers + worker
        total = sum(s.count for s in self.shards)
        lo, hi = consumer_range(total, consumer, self.world_size * num_workers)
        reader = _ShardReader(self.fmt["resolution"], self.fmt["channels"])
        ids: list[int] = []
        images: list[torch.Tensor] = []
        start = 0  # position of this shard in the concatenation of the given shards
        for shard in self.shards:
            a, b = max(lo - start, 0), min(hi - start, shard.count)
            start += shard.count
            if a >= b:
                continue
            for index, arr in reader.read(shard, a, b):
                ids.append(shard.offset + index)
                images.append(to_tensor(arr))
                if len(ids) == self.batch_size:
                    yield torch.tensor(ids, dtype=torch.long), torch.stack(images), reader.take_summary()
                    ids, images = [], []
        if ids:
            yield torch.tensor(ids, dtype=torch.long), torch.stack(images), reader.take_summary()
        elif reader.summary.seen:
            empty = torch.empty(0, dtype=torch.long)
            yield empty, torch.empty(0), reader.take_summary()  # counts only; dropped by caller


class EvalBatches:
    """Iterator of (ids, images) over this rank's share; ``summary`` holds the bad-input counts."""

    def __init__(self, dataset: _EvalPass, num_workers: int, max_bad_fraction: float, setting: str | None):
        self.dataset = dataset
        self.num_workers = num_workers
        self.max_bad_fraction = max_bad_fraction
        self.setting = setting
        self.summary = DataSummary()
        self.total = sum(s.count for s in dataset.shards)
        self._it = self._run()

    def _run(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        remote = any(backend.is_remote(s.url) for s in self.dataset.shards)
        for ids, images, delta in _loader(self.dataset, self.num_workers, remote=remote):
            self.summary.merge(delta)
            # Against the whole set's size: a rank cannot know the others' counts.
            if self.summary.bad_total > self.max_bad_fraction * self.total:
                self.summary.check(self.max_bad_fraction, setting=self.setting)
            if len(ids):
                yield ids, images
        _finish(self.summary, self.max_bad_fraction, f"eval rank {self.dataset.rank}", self.setting)

    @property
    def shards(self) -> list[ShardInfo]:
        """All shards of the pass (url, count, offset in the split, …), in the given order."""
        return self.dataset.shards

    def __iter__(self) -> EvalBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self._it)


def eval_batches(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 2,
    max_bad_fraction: float = 0.0,
    setting: str | None = None,
) -> EvalBatches:
    """(ids, images) batches: each sample of the shards exactly once across ranks × workers.

    ``ids`` are global sample ids in [0, split total) from the manifest (shard offset +
    index within the shard); images are float32 (B, C, H, W) in [−1, 1]. The last batch of
    each worker may be short. Needs the manifest beside the shards (for counts/offsets).
    ``setting`` names the caller's knob for ``max_bad_fraction`` in the BadDataError message.
    """
    from adpm_dist.io import dist

    info = dist.env_info()
    rank = info.rank if rank is None else int(rank)
    world_size = info.world_size if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    expanded = expand_urls(urls)
    dupes = sorted({u for u in expanded if expanded.count(u) > 1})
    if dupes:
        raise ShardSetError(f"evaluation shards listed twice would be counted twice: {dupes[:5]}")
    try:
        shards, fmt = shard_table(expanded, require_manifest=True)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc}; evaluation needs it for the sample counts and ids. Shards written by another "
            "tool (a plain webdataset.ShardWriter) get one from adpm_dist.io.shard_reader.index_shards "
            "and adpm_dist.io.shards.write_manifest (docs/storage_data.md)") from None
    splits = {(s.manifest_url, s.split) for s in shards}
    if len(splits) > 1:
        raise ShardSetError(f"evaluation shards must come from one manifest and split, got {splits}")
    return EvalBatches(_EvalPass(shards, fmt, int(batch_size), rank, world_size), int(num_workers),
                       float(max_bad_fraction), setting)


# ============================================================================ shared helpers

_MIN_SEEN_FOR_EARLY_STOP = 256  # don't stop a run on the first bad sample of a tiny prefix


def _finish(summary: DataSummary, max_bad_fraction: float, what: str, setting: str | None) -> None:
    if summary.bad_total:
        log.warning("%s: %s", what, summary.report())
    summary.check(max_bad_fraction, setting=setting)


def _agree(name: str, given: int | None, stored: int | None, where: str) -> int | None:
    if given is not None and stored is not None and int(given) != int(stored):
        raise ShardSetError(f"{name}={given} requested, but the shards of {where} store {stored}")
    return given if given is not None else stored
