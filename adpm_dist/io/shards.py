"""Shard sets on storage: finding them, their manifests, and writing them.

A shard set is a folder (local, ``file://`` or ``s3://``) of WebDataset tars whose
members are ``{key}.png`` (uint8, 1 or 3 channels) plus per-sample fields such as
``{key}.cls`` (class index as ASCII) or ``{key}.json``, grouped by key, and a
``manifest.json`` written last: its presence means the set is complete. The manifest
lists, per shard, its name, split, sample count, offset within the split, size and
sha256, plus the image resolution and channels. The tars are plain WebDataset shards,
written by webdataset's ``TarWriter`` (:func:`write_shard`): ``webdataset.WebDataset``
reads them as they are, and our streams read shards any webdataset writer made.

:mod:`adpm_dist.io.data` streams these sets to training and evaluation;
``tools/make_shards.py`` and :mod:`adpm_dist.stages.sample` write them.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from PIL import Image

from adpm_dist.errors import UserError
from adpm_dist.io import storage

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "adpm_dist.shards/1"


# ============================================================================ URLs and manifests


class ShardSetError(UserError, ValueError):
    """A shard list or manifest the user gave cannot be used; the message names the file."""


_GLOB_CHARS = re.compile(r"[*?\[]")


def _split_top_level_commas(spec: str) -> list[str]:
    """'a-{0..3}.tar,b.tar' -> ['a-{0..3}.tar', 'b.tar'] (commas inside braces stay)."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(depth - 1, 0)
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from brace patterns, globs, folders (their *.tar) and comma lists.

    Fails before any work starts — naming the pattern or URL — when a pattern matches
    nothing, a listed shard is missing, the bucket does not exist or the server refuses
    the credentials.
    """
    import braceexpand

    items = _split_top_level_commas(spec) if isinstance(spec, str) else [str(s) for s in spec]
    if not items:
        raise ShardSetError(f"no shard URLs given: {spec!r}")
    checked_buckets: set[str] = set()
    out: list[str] = []
    for item in items:
        for url in braceexpand.braceexpand(item):
            if storage.is_remote(url):
                bucket = url[len("s3://") :].split("/", 1)[0]
                if bucket not in checked_buckets:
                    storage.check_access(url)
                    checked_buckets.add(bucket)
            if _GLOB_CHARS.search(url):
                found = storage.glob(url)
                if not found:
                    raise FileNotFoundError(f"shard pattern {url!r} (from {item!r}) matches nothing")
                out.extend(found)
            elif url.endswith("/") or (not url.endswith(".tar") and storage.isdir(url)):
                found = storage.glob(storage.join(url.rstrip("/"), "*.tar"))
                if not found:
                    raise FileNotFoundError(f"shard folder {url!r} holds no *.tar files")
                out.extend(found)
            else:
                out.append(url)
    _check_all_exist(out, spec)
    return out


def _check_all_exist(urls: list[str], spec: Any) -> None:
    """One listing per parent folder instead of one request per shard."""
    by_parent: dict[str, list[str]] = {}
    for u in urls:
        by_parent.setdefault(storage.dirname(u), []).append(u)
    for parent, members in by_parent.items():
        try:
            present = {storage.basename(p) for p in storage.listdir(parent)}
        except FileNotFoundError:
            present = set()
        missing = [u for u in members if storage.basename(u) not in present]
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise FileNotFoundError(f"{len(missing)} shard(s) from {spec!r} do not exist: {shown}")


def read_manifest(url_or_dir: str) -> dict:
    """The manifest of a shard folder (or of the manifest URL itself), validated."""
    return _manifest_and_digest(url_or_dir)[0]


def _manifest_and_digest(url_or_dir: str) -> tuple[dict, str]:
    """The validated manifest and the sha256 of its text: the identity of the shard set's content."""
    url = url_or_dir if url_or_dir.endswith(".json") else storage.join(url_or_dir, MANIFEST_NAME)
    try:
        text = storage.read_text(url)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"shard manifest {url} not found ({exc})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardSetError(f"shard manifest {url} is not valid JSON: {exc}") from None
    for name in ("shards", "resolution", "channels"):
        if name not in manifest:
            raise ShardSetError(f"shard manifest {url} lacks the field {name!r}")
    for i, entry in enumerate(manifest["shards"]):
        for name in ("name", "split", "count", "offset"):
            if name not in entry:
                raise ShardSetError(f"shard manifest {url}: shard entry {i} lacks {name!r}")
    return manifest, hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    """What we know about one shard before reading it (count/offset None without manifest).

    ``split_total`` is the size of the whole split (the end of its last shard in the manifest,
    listed or not), ``manifest_sha256`` the digest of the manifest's text: together with
    ``split`` they identify the data a sample id refers to, wherever the copy lies.
    """

    url: str
    count: int | None = None
    offset: int | None = None
    split: str | None = None
    manifest_url: str | None = None
    nbytes: int | None = None
    split_total: int | None = None
    manifest_sha256: str | None = None


def shard_table(urls: Sequence[str], *, require_manifest: bool) -> tuple[list[ShardInfo], dict]:
    """Per-shard counts/offsets from the manifests beside the shards, plus the image format.

    Returns (shards, fmt) where fmt has 'resolution' and 'channels' (None when unknown).
    """
    manifests: dict[str, tuple[dict, str] | None] = {}
    infos: list[ShardInfo] = []
    formats: set[tuple] = set()
    for url in urls:
        folder = storage.dirname(url)
        if folder not in manifests:
            try:
                manifests[folder] = _manifest_and_digest(folder)
            except FileNotFoundError:
                if require_manifest:
                    raise
                manifests[folder] = None
        if manifests[folder] is None:
            infos.append(ShardInfo(url))
            continue
        m, digest = manifests[folder]
        entry = next((s for s in m["shards"] if s["name"] == storage.basename(url)), None)
        manifest_url = storage.join(folder, MANIFEST_NAME)
        if entry is None:
            raise ShardSetError(f"shard {url} is not listed in {manifest_url}")
        same_split = (s for s in m["shards"] if s["split"] == entry["split"])
        split_total = max(int(s["offset"]) + int(s["count"]) for s in same_split)
        nbytes = int(entry["bytes"]) if "bytes" in entry else None
        infos.append(ShardInfo(url, int(entry["count"]), int(entry["offset"]), entry["split"], manifest_url,
                               nbytes, split_total, digest))
        formats.add((int(m["resolution"]), int(m["channels"])))
    if len(formats) > 1:
        raise ShardSetError(f"shards mix image formats (resolution, channels) {sorted(formats)}")
    res, ch = next(iter(formats)) if formats else (None, None)
    return infos, {"resolution": res, "channels": ch}


# ============================================================================ PNG codec


def decode_png(data: bytes, channels: int | None) -> np.ndarray:
    """PNG bytes -> uint8 array (H, W, C); converted to ``channels`` (1 or 3) if given.

    Any format PIL reads decodes the same way (JPEG shards from other writers included).
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode now: a corrupt file raises here, not later
        if channels == 1 or (channels is None and len(img.getbands()) < 3):
            img = img.convert("L")
        else:
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> PNG bytes (deterministic for equal input)."""
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ============================================================================ writing shards


class _HashingWriter(io.RawIOBase):
    """Passes bytes through while computing sha256 and size (for the manifest)."""

    def __init__(self, sink: IO[bytes]):
        super().__init__()
        self.sink = sink
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.nbytes += len(b)
        self.sink.write(b)
        return len(b)


def _tar_fields(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample for webdataset's TarWriter: checked key, every field bytes, meta fields kept out."""
    key = str(sample["__key__"])
    if not key or "." in posixpath.basename(key):
        raise ValueError(f"sample key {key!r} must be non-empty and must not contain '.' (readers "
                         "split the member name at the first dot)")
    fields: dict[str, Any] = {"__key__": key}
    for ext, value in sample.items():
        if ext.startswith("_"):  # __key__, and meta fields a reader adds (__url__): not members
            continue
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"sample {key!r}: field {ext!r} is {type(value).__name__}, not bytes or str")
        fields[ext] = bytes(value)
    return fields


def write_shard(url: str, samples: Iterable[dict[str, Any]]) -> dict:
    """Write one tar shard atomically with webdataset's TarWriter; returns {'count', 'sha256', 'bytes'}.

    Each sample is {'__key__': key, ext: bytes-or-str, ...}; fields starting with '_' (such
    as the '__url__' a reader adds) are not written. TarWriter writes a sample's members
    consecutively, sorted by extension. Member metadata is fixed (mtime 0, mode 0444, owner
    'bigdata'), so equal samples give byte-identical shards and reruns are idempotent.
    """
    from webdataset import TarWriter

    count = 0
    with storage.open_write(url) as raw:
        hashing = _HashingWriter(raw)
        # encoder=False: fields are bytes already; webdataset's default encoders would
        # re-encode by extension.
        with TarWriter(hashing, encoder=False, mtime=0, mode=0o444) as tar:
            for sample in samples:
                tar.write(_tar_fields(sample))
                count += 1
    return {"count": count, "sha256": hashing.sha.hexdigest(), "bytes": hashing.nbytes}


def write_split(
    out_url: str,
    split: str,
    images: Iterable[np.ndarray],
    labels: Iterable[int] | None,
    *,
    shard_size: int,
    progress: Any = None,
) -> list[dict]:
    """Write ``{split}-000000.tar``… under ``out_url``; returns the manifest shard entries.

    Keys are ``{split}_{index:08d}`` with index the sample's id within the split.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    entries: list[dict] = []
    label_iter = iter(labels) if labels is not None else None
    pending: list[dict] = []
    index = 0

    def flush() -> None:
        name = f"{split}-{len(entries):06d}.tar"
        result = write_shard(storage.join(out_url, name), pending)
        offset = entries[-1]["offset"] + entries[-1]["count"] if entries else 0
        entries.append({"name": name, "split": split, "offset": offset, **result})
        pending.clear()

    for arr in images:
        sample: dict[str, bytes | str] = {"__key__": f"{split}_{index:08d}", "png": encode_png(arr)}
        if label_iter is not None:
            sample["cls"] = str(int(next(label_iter)))
        pending.append(sample)
        index += 1
        if progress is not None:
            progress()
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    return entries


def write_manifest(out_url: str, manifest: dict) -> str:
    """Write manifest.json last (atomically): its presence marks the shard set complete."""
    url = storage.join(out_url, MANIFEST_NAME)
    storage.write_text(url, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return url
