"""The training data as the loop consumes it: this rank's stream and exact-resume batching."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from adpm_dist.io import dist
from adpm_dist.train.config import Config, ConfigError
from adpm_dist.train.engine import per_rank_batch


def batches_from(stream, start_step: int, batches_per_epoch: int) -> Iterator[torch.Tensor]:
    """Batches from step ``start_step`` on: epoch s // B, skipping the s % B already used."""
    epoch, skip = divmod(start_step, batches_per_epoch)
    while True:
        count = 0
        for i, batch in enumerate(stream.epoch(epoch)):
            count += 1
            if i >= skip:
                yield batch
        if count != batches_per_epoch:
            raise RuntimeError(
                f"training stream epoch {epoch} gave {count} batches, expected {batches_per_epoch}"
            )
        epoch, skip = epoch + 1, 0


def default_batches_per_epoch(cfg: Config) -> int:
    """One pass over the data set: (samples in the manifests) // global batch (at least 1)."""
    from adpm_dist.io.shards import expand_urls, shard_table

    shards, _ = shard_table(expand_urls(list(cfg.data.urls)), require_manifest=False)
    if any(s.count is None for s in shards):
        raise ConfigError(
            "config key 'data.batches_per_epoch' is 0 but the shards have no manifest to count "
            "samples from; set it explicitly"
        )
    return max(1, sum(int(s.count) for s in shards) // cfg.data.batch_size)


def make_stream(cfg: Config, model_config: dict, info: dist.DistInfo):
    """The data layer's TrainStream for this rank (equal batch counts on every rank)."""
    from adpm_dist.io import data

    per_rank = per_rank_batch(cfg, info.world_size)
    bpe = cfg.data.batches_per_epoch
    if bpe == 0:
        bpe = default_batches_per_epoch(cfg)
    resolution = cfg.data.resolution or model_config.get("resolution")
    channels = cfg.data.channels or model_config.get("in_channels")
    stream = data.TrainStream(
        list(cfg.data.urls),
        batch_size=per_rank,
        seed=cfg.train.seed,
        rank=info.rank,
        world_size=info.world_size,
        batches_per_epoch=bpe,
        num_workers=cfg.data.num_workers,
        resolution=resolution,
        channels=channels,
        hflip=cfg.data.hflip,
        shuffle_buffer=cfg.data.shuffle_buffer,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )
    return stream, bpe
