"""Reading WebDataset shards with webdataset's own pieces, and what we add on top.

webdataset does the tar iteration and the grouping of members into samples
(``webdataset.tariterators.tar_file_expander`` and ``group_by_keys``): any member order
within a sample, any extra fields (``.cls``, ``.json``, …), ``.tar`` or compressed tars.
On top of that this module adds what webdataset does not do:

- **the stream**: our storage layer opens the shard (``s3://`` included), and small remote
  shards are fetched with one GET (see ``WHOLE_SHARD_MAX_BYTES``);
- **no cut-off sample**: webdataset's grouping hands out the sample it was assembling when
  a tar breaks, and tarfile ends a tar cut on a member boundary silently. A webdataset
  handler (:class:`_FirstError`) records the first error and ends the shard; a tar that
  stops without its end-of-archive blocks counts as such an error; and no sample that
  arrives after an error is yielded;
- **accounting**: :class:`_ShardReader` decodes and checks each sample and counts every
  bad one by kind and file (:mod:`adpm_dist.io.quality`), including samples a broken shard
  no longer holds.

Importing this module registers an ``s3://`` opener in ``webdataset.gopen.gopen_schemes``
(at import time, so DataLoader workers started with spawn get it too): after
``import adpm_dist.io.data``, a plain ``webdataset.WebDataset("s3://…")`` or
``webdataset.ShardWriter("s3://…")`` reads and writes through our storage layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander

from adpm_dist.io import storage
from adpm_dist.io.quality import DataSummary, FileWarner
from adpm_dist.io.shards import MANIFEST_FORMAT, ShardInfo, ShardSetError, decode_png

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

# The fields a sample's image may be in, first match wins; PIL decodes each of them.
IMAGE_FIELDS = ("png", "jpg", "jpeg")

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


class _FirstError:
    """A webdataset ``handler``: remembers the first exception and ends the shard (False)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def __call__(self, exn: BaseException) -> bool:
        if self.error is None:
            self.error = exn
        return False

    def message(self) -> str:
        return "" if self.error is None else self.describe(self.error)

    @staticmethod
    def describe(exc: BaseException) -> str:
        """The error's own text, without the stream webdataset appends to its arguments."""
        first = str(exc.args[0]) if exc.args else type(exc).__name__
        return first.split(" @ <", 1)[0]


_BLOCK = 512
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: tarfile reads them


class _TailReader(io.RawIOBase):
    """Passes a shard's bytes to tarfile, counting them and the zero bytes they end with.

    A complete tar ends with its end-of-archive marker (two zero blocks, then zero padding),
    which every tar writer puts there; tarfile stops at the first zero block but also,
    silently, at a cut on a member boundary. The bytes tell the two apart: at least one
    zero block at the end, or a cut-off tar (member data is padded with fewer than 512 zeros).
    """

    def __init__(self, raw: IO[bytes], url: str):
        super().__init__()
        self.raw = raw
        self.url = url
        self.nbytes = 0
        self.head = b""
        self.trailing_zeros = 0

    def __repr__(self) -> str:  # webdataset appends the stream to its error messages
        return f"<shard {self.url}>"

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            if self.nbytes < 8:
                self.head = (self.head + data)[:8]
            self.nbytes += len(data)
            kept = len(data.rstrip(b"\0"))
            self.trailing_zeros = self.trailing_zeros + len(data) if kept == 0 else len(data) - kept
        return data

    def ends_cleanly(self) -> bool:
        """Read what tarfile left (the padding after the marker) and look for the marker."""
        if self.head.startswith(_COMPRESSED_MAGIC):
            return True  # the decompressor sees the marker, not us; not our format anyway
        while self.read(1 << 16):
            pass
        return self.trailing_zeros >= _BLOCK


def _files_until_error(files: Iterable[dict], stream: _TailReader, errors: _FirstError) -> Iterator[dict]:
    """Tar members from ``tar_file_expander``; ends at the first error instead of passing on the
    end-of-shard marker ({}), and makes a tar without its end-of-archive marker an error."""
    for item in files:
        if item == {}:
            if errors.error is None and not stream.ends_cleanly():
                errors(tarfile.ReadError(f"tar ends after {stream.nbytes} bytes without its "
                                         "end-of-archive blocks (cut off)"))
            if errors.error is not None:
                return
        yield item


def _shard_samples(url: str, nbytes: int | None, errors: _FirstError) -> Iterator[dict[str, Any]]:
    """Complete samples of one shard in tar order, grouped by webdataset.

    Stops at the first error, which ``errors`` holds (opening errors propagate). The sample
    being assembled then is never yielded: webdataset's grouping hands it out last, after
    the error was recorded, and anything that arrives after an error is dropped here.
    """
    with _open_shard(url, nbytes) as raw:
        stream = _TailReader(raw, url)
        files = tar_file_expander([{"url": url, "stream": stream}], handler=errors)
        for sample in group_by_keys(_files_until_error(files, stream, errors), handler=errors):
            if errors.error is not None:
                return
            yield sample


def _numbered(url: str, nbytes: int | None, errors: _FirstError,
             stop_after: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index in shard, sample) of :func:`_shard_samples`, at most ``stop_after`` of them; the
    shard is closed as soon as the consumer stops."""
    with contextlib.closing(_shard_samples(url, nbytes, errors)) as samples:
        for index, sample in enumerate(samples):
            yield index, sample
            if stop_after is not None and index + 1 >= stop_after:
                return


def _iter_tar_groups(
    url: str, stop_after: int | None = None, nbytes: int | None = None
) -> Iterator[dict[str, Any]]:
    """Samples of one shard in tar order as {'__key__': key, '__url__': url, ext: bytes, ...}.

    A sample cut by truncation is never yielded; the error (tarfile.TarError, EOFError,
    OSError, …) is raised after the complete samples. Stops early after ``stop_after``
    samples. ``nbytes`` (from the manifest) lets small remote shards be fetched in one request.
    """
    errors = _FirstError()
    for _index, sample in _numbered(url, nbytes, errors, stop_after):
        yield sample
    if errors.error is not None:
        raise errors.error


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) on the 256-level grid in [−1, 1]."""
    # copy: PIL-backed arrays are read-only, and torch warns about (and cannot own) those
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float() / 127.5 - 1.0


def _error_kind(exc: BaseException) -> str:
    """A broken tar or sample grouping loses samples ('truncated'); an I/O error loses the shard."""
    return "unreadable_shard" if isinstance(exc, OSError) else "truncated"


class _ShardReader:
    """Reads samples from shards, decoding and checking them, counting every bad one."""

    def __init__(self, resolution: int | None, channels: int | None,
                 image_fields: tuple[str, ...] = IMAGE_FIELDS):
        self.resolution = resolution
        self.channels = channels
        self.image_fields = image_fields
        self.summary = DataSummary()
        self.warn = FileWarner()

    def _bad(self, url: str, kind: str, detail: str, n: int = 1) -> None:
        self.summary.add_bad(url, kind, n)
        self.warn(url, kind, detail)

    def decode(self, url: str, sample: dict[str, Any]) -> np.ndarray | None:
        for field in self.image_fields:
            if field in sample:
                break
        else:
            wanted = "/".join(f".{f}" for f in self.image_fields)
            self._bad(url, "missing_field", f"sample {sample['__key__']!r} has no image ({wanted})")
            return None
        try:
            arr = decode_png(sample[field], self.channels)
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
        seen = 0  # samples with index in [lo, hi)
        last = -1
        errors = _FirstError()
        problem: tuple[str, str] | None = None
        try:
            for last, sample in _numbered(shard.url, shard.nbytes, errors, stop_after):
                if last < lo:
                    continue
                if count is not None and last >= count:
                    self._bad(shard.url, "unexpected_sample",
                              f"sample {sample['__key__']!r} beyond the manifest count {count}")
                    continue
                seen += 1
                arr = self.decode(shard.url, sample)
                if arr is not None:
                    self.summary.good += 1
                    yield last, arr
        except OSError as exc:  # the shard could not be opened or fetched
            problem = ("unreadable_shard", str(exc))
        if errors.error is not None:
            kind = _error_kind(errors.error)
            detail = errors.message()
            problem = (kind, f"tar ends or breaks after {last + 1} samples: {detail}" if kind == "truncated"
                       else detail)
        if hi is not None:
            missing = max(hi - lo, 0) - seen
            if missing > 0:
                kind, detail = problem or ("truncated", f"{last + 1} samples, manifest says {count}")
                self._bad(shard.url, kind, detail, missing)
        elif problem is not None:
            self._bad(shard.url, problem[0], problem[1])

    def take_summary(self) -> dict:
        """The counts since the last call (a delta, sent from workers with each batch)."""
        out = self.summary.to_dict()
        self.summary = DataSummary()
        return out


# ============================================================ manifests for shards made elsewhere


def _sha256_and_size(url: str) -> tuple[str, int]:
    sha, nbytes = hashlib.sha256(), 0
    with storage.open_read(url) as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            nbytes += len(chunk)
    return sha.hexdigest(), nbytes


def index_shards(urls: list[str], split: str = "train") -> dict:
    """The manifest of shards written by another tool (a plain ``webdataset.ShardWriter``):
    per shard its sample count, offset in ``split`` (in the order given), size and sha256,
    and the image format of the first sample. Write it beside the shards with
    :func:`adpm_dist.io.shards.write_manifest`; evaluation needs it (ids and counts).

    Reads every shard once; a shard that cannot be read completely, or shards in more than
    one folder, are a :class:`ShardSetError` naming the shard.
    """
    folders = {storage.dirname(u) for u in urls}
    if len(folders) != 1:
        raise ShardSetError(f"a manifest describes the shards of one folder; got {sorted(folders)}")
    entries: list[dict] = []
    fmt: tuple[int, int] | None = None
    reader = _ShardReader(None, None)
    for url in urls:
        count = 0
        try:
            for sample in _iter_tar_groups(url):
                if fmt is None and (arr := reader.decode(url, sample)) is not None:
                    fmt = (int(arr.shape[0]), int(arr.shape[2]))
                count += 1
        except (tarfile.TarError, EOFError, ValueError) as exc:
            raise ShardSetError(f"shard {url} cannot be indexed: it breaks after {count} samples "
                                f"({_FirstError.describe(exc)})") from None
        sha, nbytes = _sha256_and_size(url)
        offset = entries[-1]["offset"] + entries[-1]["count"] if entries else 0
        entries.append({"name": storage.basename(url), "split": split, "offset": offset, "count": count,
                        "sha256": sha, "bytes": nbytes})
    if fmt is None:
        raise ShardSetError(f"no decodable square image in {urls[0]}…: {reader.summary.report()}")
    total = sum(e["count"] for e in entries)
    return {"format": MANIFEST_FORMAT, "source": f"indexed {len(urls)} existing shards",
            "resolution": fmt[0], "channels": fmt[1], "total": total,
            "splits": {split: {"total": total, "num_shards": len(entries)}}, "shards": entries}
