"""The training data as the loop consumes it: this rank's stream and exact-resume batching,
and the check, before any work, that the data exists and fits the model."""

from __future__ import annotations

import posixpath
import re
import tarfile
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


# ---------------------------------------------------------------- does the data fit the model?

_FIRST_SAMPLES = 8  # a broken first sample should not hide the shape of the next ones


def _make_shards_hint(url: str) -> str:
    """The tools/make_shards.py command that would write the shards ``url`` looks for."""
    folder = posixpath.dirname(url) if re.search(r"[*?\[{]|\.tar$", url) else url.rstrip("/")
    source = next((s for s in ("digits", "mnist") if s in posixpath.basename(folder)), "<source>")
    return f"python tools/make_shards.py {source} {folder or '.'}"


def _expand(cfg: Config) -> list[str]:
    from adpm_dist.io.shards import expand_urls

    if not cfg.data.urls:
        raise ConfigError("config key 'data.urls' is empty: name the training shards "
                          "(write them with python tools/make_shards.py <source> <folder>)")
    try:
        return expand_urls(list(cfg.data.urls))
    except FileNotFoundError as exc:  # a pattern, folder, shard or bucket that is not there
        raise ConfigError(f"config key 'data.urls': {exc}; make the shards first: "
                          f"{_make_shards_hint(cfg.data.urls[0])}") from None


def data_shape(urls: list[str]) -> tuple[int, int, int, str] | None:
    """(height, width, channels, where) of the first decodable sample of ``urls[0]``, else the
    manifests' format; None when neither can be read (the stream then counts what is bad).
    Manifests that disagree (formats, shard lists) are a ConfigError."""
    from adpm_dist.io.data import _iter_tar_groups
    from adpm_dist.io.shards import decode_png, shard_table

    try:
        fmt = shard_table(urls, require_manifest=False)[1]
    except ValueError as exc:  # a shard its manifest does not list, shards of mixed formats
        raise ConfigError(f"config key 'data.urls': {exc}") from None
    try:
        for sample in _iter_tar_groups(urls[0], stop_after=_FIRST_SAMPLES):
            try:
                arr = decode_png(sample["png"], None)
            except Exception:  # noqa: BLE001 - an unusable sample: try the next one
                continue
            return arr.shape[0], arr.shape[1], arr.shape[2], f"first sample of {urls[0]}"
    except (tarfile.TarError, EOFError, OSError):
        pass
    if fmt["resolution"] is None:
        return None
    return fmt["resolution"], fmt["resolution"], fmt["channels"], "manifest"


def _models_for(h: int, w: int, c: int) -> str:
    """The presets built for h×w×c data, else the keys that set a model's shape."""
    from adpm_dist.models.registry import PRESETS

    fits = [n for n, p in PRESETS.items() if p.get("resolution") == h == w and p.get("in_channels") == c]
    keys = "'model.options.resolution'" + ("" if h == w else " (square images only)")
    return f"'model.preset'={' or '.join(fits)}" if fits else keys


def _shape(h: int, w: int, c: int) -> str:
    return f"{h}×{w}×{c}"


def check_data(cfg: Config, model_config: dict) -> None:
    """ConfigError, naming the data URL, the config keys and both shapes, when the training
    shards are missing or their images do not fit the model (resolution, channels)."""
    urls = _expand(cfg)
    res, c_in = model_config.get("resolution"), model_config.get("in_channels")
    found = data_shape(urls)
    if found is None or res is None or c_in is None:
        return
    h, w, c, where = found
    data_url = cfg.data.urls[0]
    model = (f"the model (config keys 'model.preset'={cfg.model.preset!r}, 'model.options') "
             f"takes {_shape(res, res, c_in)}")
    have = f"data {data_url!r} holds {_shape(h, w, c)} images ({where})"
    if cfg.data.resolution is not None and cfg.data.resolution != h:
        raise ConfigError(f"config key 'data.resolution'={cfg.data.resolution}, but {have}; "
                          "unset it or write shards of that size (make_shards.py --resolution)")
    if (h, w) != (res, res):
        fit = " --fit resize" if max(h, w) > res else ""
        raise ConfigError(f"{have}, but {model}: write shards at {res}×{res} (make_shards.py "
                          f"--resolution {res}{fit}) or use a model for {h}×{w}×{c} "
                          f"({_models_for(h, w, c)})")
    if cfg.data.channels is not None and cfg.data.channels != c_in:
        raise ConfigError(f"config key 'data.channels'={cfg.data.channels}, but {model} "
                          f"('model.options.in_channels'={c_in})")
    if cfg.data.channels is None and c != c_in:
        raise ConfigError(f"{have}, but {model}: set 'data.channels'={c_in} to convert them, or "
                          f"'model.options.in_channels'={c} (and out_channels)")
