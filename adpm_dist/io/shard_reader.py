"""Reading WebDataset shards: the s3:// opener for webdataset, tar members grouped into
samples, and decoding them to images with bad input skipped and counted.

Importing this module registers an ``s3://`` opener in ``webdataset.gopen.gopen_schemes``
(at import time, so DataLoader workers started with spawn get it too).
"""

from __future__ import annotations

import contextlib
import io
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
import torch

from adpm_dist.io import storage
from adpm_dist.io.quality import DataSummary, FileWarner
from adpm_dist.io.shards import ShardInfo, decode_png

log = logging.getLogger(__name__)

# ============================================================================ webdataset hook


def _gopen_storage(url: str, mode: str = "rb", bufsize: int = 8192, **_kw: Any) -> IO[bytes]:
    """webdataset opener for s3:// through our storage layer (per-process client)."""
    fs = storage.filesystem(url)
    return fs.open(url[len("s3://") :], mode)


def _register_gopen() -> None:
    import importlib

    # `import webdataset.gopen` would bind the package's *function* gopen, which shadows
    # the submodule of the same name; import_module returns the module itself.
    wds_gopen = importlib.import_module("webdataset.gopen")
    wds_gopen.gopen_schemes["s3"] = _gopen_storage


_register_gopen()


# ============================================================================ reading shards


# Remote shards up to this size are fetched with one GET (retried as a whole) and parsed
# from memory: tarfile's many small reads through s3fs's buffered file cost ~25% of the
# decode rate otherwise. Larger shards are streamed.
WHOLE_SHARD_MAX_BYTES = 256 << 20


@contextlib.contextmanager
def _open_shard(url: str, nbytes: int | None) -> Iterator[IO[bytes]]:
    if storage.is_remote(url) and nbytes is not None and nbytes <= WHOLE_SHARD_MAX_BYTES:
        yield io.BytesIO(storage.read_bytes(url))
    else:
        with storage.open_read(url) as f:
            yield f


def _iter_tar_groups(
    url: str, stop_after: int | None = None, nbytes: int | None = None
) -> Iterator[dict[str, bytes]]:
    """Samples of one shard in tar order as {'__key__': key, ext: bytes, ...}.

    A group is yielded only once complete (the next key starts or the tar ends), so a
    sample cut by truncation is never yielded. Stops early after ``stop_after`` groups.
    Tar/IO errors propagate to the caller, which accounts for them. ``nbytes`` (from the
    manifest) lets small remote shards be fetched in one request.
    """
    n = 0
    with _open_shard(url, nbytes) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        key, sample = None, {}
        for member in tar:
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            stem, _, ext = base.partition(".")
            k = posixpath.join(folder, stem)
            extracted = tar.extractfile(member)
            data = extracted.read() if extracted is not None else b""
            if k != key:
                if key is not None:
                    yield sample
                    n += 1
                    if stop_after is not None and n >= stop_after:
                        return
                key, sample = k, {"__key__": k}
            sample[ext] = data
        if key is not None:
            yield sample


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) on the 256-level grid in [−1, 1]."""
    # copy: PIL-backed arrays are read-only, and torch warns about (and cannot own) those
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float() / 127.5 - 1.0


class _ShardReader:
    """Reads samples from shards, decoding and checking them, counting every bad one."""

    def __init__(self, resolution: int | None, channels: int | None, image_field: str = "png"):
        self.resolution = resolution
        self.channels = channels
        self.image_field = image_field
        self.summary = DataSummary()
        self.warn = FileWarner()

    def _bad(self, url: str, kind: str, detail: str, n: int = 1) -> None:
        self.summary.add_bad(url, kind, n)
        self.warn(url, kind, detail)

    def decode(self, url: str, sample: dict[str, bytes]) -> np.ndarray | None:
        if self.image_field not in sample:
            self._bad(url, "missing_field", f"sample {sample['__key__']!r} has no .{self.image_field}")
            return None
        try:
            arr = decode_png(sample[self.image_field], self.channels)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means an unusable image
            self._bad(url, "undecodable_image", f"sample {sample['__key__']!r}: {exc}")
            return None
        if self.channels is None:  # no manifest: the first image fixes the format
            self.channels = arr.shape[2]
        if self.resolution is None and arr.shape[0] == arr.shape[1]:
            self.resolution = arr.shape[0]
        if arr.shape[:2] != (self.resolution, self.resolution):
            self._bad(
                url,
                "wrong_size",
                f"sample {sample['__key__']!r} is {arr.shape[1]}x{arr.shape[0]}, "
                f"expected {self.resolution}x{self.resolution}",
            )
            return None
        return arr

    def read(self, shard: ShardInfo, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(index in shard, image) for samples lo <= index < hi that decode correctly.

        Samples in [lo, hi) that are absent (truncated/unreadable shard) are counted as bad
        by this reader — and only by it, since ranges of different readers do not overlap.
        """
        count = shard.count
        hi = count if hi is None else hi
        # Read to the end when the range reaches the shard's end: extra samples get counted.
        stop_after = hi if (hi is not None and count is not None and hi < count) else None
        seen = 0  # groups with index in [lo, hi)
        index = -1
        problem: tuple[str, str] | None = None
        try:
            for index, sample in enumerate(_iter_tar_groups(shard.url, stop_after, shard.nbytes)):
                if index < lo:
                    continue
                if count is not None and index >= count:
                    self._bad(
                        shard.url,
                        "unexpected_sample",
                        f"sample {sample['__key__']!r} beyond the manifest count {count}",
                    )
                    continue
                seen += 1
                arr = self.decode(shard.url, sample)
                if arr is not None:
                    self.summary.good += 1
                    yield index, arr
        except (tarfile.TarError, EOFError) as exc:
            problem = ("truncated", f"tar ends or breaks after {index + 1} samples: {exc}")
        except OSError as exc:
            problem = ("unreadable_shard", str(exc))
        if hi is not None:
            missing = max(hi - lo, 0) - seen
            if missing > 0:
                kind, detail = problem or ("truncated", f"{index + 1} samples, manifest says {count}")
                self._bad(shard.url, kind, detail, missing)
        elif problem is not None:
            self._bad(shard.url, problem[0], problem[1])

    def take_summary(self) -> dict:
        """The counts since the last call (a delta, sent from workers with each batch)."""
        out = self.summary.to_dict()
        self.summary = DataSummary()
        return out
