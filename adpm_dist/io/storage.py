"""One storage layer for plain paths, ``file://`` and ``s3://`` URLs (through fsspec).

Every stage reads and writes through these functions, so that datasets, checkpoints,
Γ files and generated images can live on local disk or in any S3-compatible store.

- **Credentials** come from ``AWS_ENDPOINT_URL`` / ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` (read when a filesystem is created), overridable with
  :func:`configure`. They never appear in an error message: messages are scrubbed.
- **One filesystem per process, created lazily**: the cache is keyed by PID, so a forked
  DataLoader worker builds its own client instead of inheriting a live connection pool
  and event loop from its parent.
- **Atomic writes**: local files are written to a temporary name in the same folder and
  renamed; an S3 object only becomes visible when its upload completes (a single PUT, or
  a multipart upload that is aborted on error).
- **Retries with backoff** of each S3 request on transient errors (connection resets,
  timeouts, 5xx, throttling), in one layer (botocore's request loop, see backend), each
  announced on stderr as one ``warning:`` line. Missing objects, missing buckets and refused
  (or missing) credentials are not transient and fail at once with a message naming the URL.
- **Claims** (:func:`claim`): one job owns an output prefix; another job is refused.

This module is the operations; :mod:`adpm_dist.io.backend` holds the URL parsing,
settings, the per-process filesystem cache and the retry handler they stand on (its public
names are importable from here too).
"""

from __future__ import annotations

import contextlib
import glob as _pyglob
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import IO

from adpm_dist.errors import UserError

# The public names of the layer below, so that callers need only ``storage``.
from adpm_dist.io.backend import (  # noqa: F401
    StorageAccessDenied,
    StorageError,
    StorageNotFound,
    basename,
    canonical,
    clear_cache,
    configure,
    dirname,
    filesystem,
    fs_path,
    is_remote,
    join,
    local_path,
    redact,
    run_op,
    scheme,
    to_url,
)

# ----------------------------------------------------------------------------- reading


def exists(url: str) -> bool:
    """True if an object/file or folder exists at ``url``. Refused credentials raise."""
    fs = filesystem(url)
    return run_op("exists", url, lambda: fs.exists(fs_path(url)))


def isdir(url: str) -> bool:
    fs = filesystem(url)
    return run_op("isdir", url, lambda: fs.isdir(fs_path(url)))


def size(url: str) -> int:
    fs = filesystem(url)
    return int(run_op("size", url, lambda: fs.size(fs_path(url))))


def read_bytes(url: str) -> bytes:
    fs = filesystem(url)
    return run_op("read", url, lambda: fs.cat_file(fs_path(url)))


def read_text(url: str, encoding: str = "utf-8") -> str:
    return read_bytes(url).decode(encoding)


def read_json_object(url: str, error: type[Exception], hint: str = "") -> dict:
    """The JSON object at ``url``; ``error`` naming the (redacted) URL if it is not valid JSON
    or not an object, with ``hint`` (e.g. "; remove it to start over") appended."""
    try:
        doc = json.loads(read_text(url))
    except json.JSONDecodeError as exc:
        raise error(f"{redact(url)}: not valid JSON ({exc}){hint}") from None
    if not isinstance(doc, dict):
        raise error(f"{redact(url)}: not a JSON object{hint}")
    return doc


@contextlib.contextmanager
def open_read(url: str) -> Iterator[IO[bytes]]:
    """Open ``url`` for streaming binary reads (each ranged GET is retried by botocore)."""
    fs = filesystem(url)
    f = run_op("open", url, lambda: fs.open(fs_path(url), "rb"))
    try:
        yield f
    finally:
        f.close()


def listdir(url: str) -> list[str]:
    """Full URLs of the entries directly under ``url`` (sorted)."""
    if not is_remote(url):
        path = local_path(url)
        names = run_op("list", url, lambda: os.listdir(path))
        return sorted(join(url, n) for n in names)
    fs = filesystem(url)
    path = fs_path(url).rstrip("/")
    entries = run_op("list", url, lambda: fs.ls(path, detail=False))
    out = sorted(to_url(url, e) for e in entries)
    # s3fs lists a key "dir/" as the folder itself; never return the folder as its own entry.
    return [e for e in out if e.rstrip("/") != str(url).rstrip("/")]


def glob(pattern: str) -> list[str]:
    """Full URLs matching a shell-style pattern (sorted; empty list when nothing matches)."""
    if not is_remote(pattern):
        found = _pyglob.glob(local_path(pattern))
        return sorted(found if scheme(pattern) == "" else ["file://" + p for p in found])
    fs = filesystem(pattern)
    found = run_op("glob", pattern, lambda: fs.glob(fs_path(pattern)))
    return sorted(to_url(pattern, p) for p in found)


def walk_files(url: str) -> list[str]:
    """Full URLs of every file below ``url`` (recursive, sorted)."""
    if not is_remote(url):
        root = local_path(url)
        found = [
            os.path.join(d, n).replace(os.sep, "/")[len(root.rstrip("/")) + 1 :]
            for d, _, names in os.walk(root)
            for n in names
        ]
        return sorted(join(url, rel) for rel in found)
    fs = filesystem(url)
    base = fs_path(url).rstrip("/")
    found = run_op("find", url, lambda: fs.find(base))
    return sorted(to_url(url, p) for p in found)


def check_access(url: str) -> None:
    """Fail early, naming the URL, if the server refuses us or the bucket does not exist.

    Call this before any work starts (writers, long jobs): a wrong key or a misspelt
    bucket should stop a job in its first second, not after an hour of compute.
    """
    if not is_remote(url):
        return
    bucket = fs_path(url).split("/", 1)[0]
    fs = filesystem(url)
    run_op("access", url, lambda: fs.ls(bucket, detail=False))


# ----------------------------------------------------------------------------- writing


def makedirs(url: str) -> None:
    """Create a local folder and its parents (S3 has no folders: a no-op there)."""
    if is_remote(url):
        return
    os.makedirs(local_path(url), exist_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: os.umask is process-global and not thread-safe to probe


def _local_tmp(path: str) -> tuple[int, str]:
    """A temporary file beside ``path`` (same filesystem, so the final rename is atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
    return fd, tmp


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` atomically: readers see the old object/file or the new one, never a part."""
    if is_remote(url):
        fs = filesystem(url)
        run_op("write", url, lambda: fs.pipe_file(fs_path(url), bytes(data)))
        return
    with open_write(url) as f:
        f.write(data)


def write_text(url: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(url, text.encode(encoding))


@contextlib.contextmanager
def open_write(url: str) -> Iterator[IO[bytes]]:
    """Stream a large object; it appears under ``url`` only if the block exits cleanly.

    Local: a temporary file renamed on success. S3: a (multipart) upload completed on
    success and aborted on error, so a crashed writer leaves nothing under ``url``.
    """
    if is_remote(url):
        fs = filesystem(url)
        f = run_op("open", url, lambda: fs.open(fs_path(url), "wb"))
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # aborts the multipart upload; nothing becomes visible
                f.closed = True  # so fsspec's __del__ does not try to finish the upload
            raise
        run_op("write", url, f.close)
        return
    path = local_path(url)
    fd, tmp = _local_tmp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove(url: str, recursive: bool = False) -> None:
    """Delete ``url`` (a missing object is fine); ``recursive`` deletes a folder tree."""
    fs = filesystem(url)
    path = fs_path(url)

    def _rm() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    run_op("remove", url, _rm)


def copy_file(src: str, dst: str) -> None:
    """Copy one file between any two storage URLs (atomic at the destination)."""
    with open_read(src) as fin, open_write(dst) as fout:
        shutil.copyfileobj(fin, fout, length=8 << 20)


def upload_dir(local_dir: str, url: str) -> list[str]:
    """Copy every file below ``local_dir`` to ``url`` (each file atomically); returns URLs.

    Files are written in sorted order. A caller that needs the folder to look complete
    (a checkpoint) should write its own completion marker after this returns.
    """
    if not os.path.isdir(local_dir):
        raise StorageNotFound(f"upload {local_dir}: not a local folder")
    written = []
    for root, _dirs, files in sorted(os.walk(local_dir)):
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            dst = join(url, rel)
            if is_remote(dst):
                fs = filesystem(dst)
                run_op("upload", dst, lambda f=fs, s=src, d=dst: f.put_file(s, fs_path(d)))
            else:
                copy_file(src, dst)
            written.append(dst)
    return written


def download_dir(url: str, local_dir: str) -> list[str]:
    """Copy every file below ``url`` into ``local_dir`` (each file atomically); returns paths."""
    files = walk_files(url)
    if not files and not exists(url):
        raise StorageNotFound(f"download {url}: not found")
    base = fs_path(url).rstrip("/")
    out = []
    for src in files:
        rel = fs_path(src)[len(base) :].lstrip("/")
        dst = os.path.join(local_dir, *rel.split("/"))
        copy_file(src, dst)
        out.append(dst)
    return out


# ----------------------------------------------------------------------------- claims

CLAIM_LOCAL = "_claim"  # local: the one claim file of a prefix
CLAIMS_REMOTE = "_claims"  # s3: a folder of claims, <owner>-<random token> each


class PrefixClaimed(UserError):
    """Another job (a different owner) holds the output prefix."""


def claim(prefix: str, owner: str, note: str = "") -> str | None:
    """Make ``owner`` (a job identity: letters, digits, ``-_``) the one writer under ``prefix``.

    Returns the URL of the claim this call created (give it to :func:`release` if the job
    then refuses to run), or None when ``owner`` already held the prefix locally. Raises
    :class:`PrefixClaimed`, naming the other owner's claim and its ``note``, when the prefix
    belongs to another owner. A claim is never removed by a job that runs: the prefix stays
    owned by that job (its reruns and resumes are accepted).

    Local: one file created with O_EXCL (atomic: the first job wins). On S3 a conditional
    create cannot be relied on (S3-compatible servers need not honour ``If-None-Match: *``;
    rclone's overwrites), so each job writes its own claim object, then lists the claims: a
    claim of another owner means refuse (and delete our own). Listing after writing makes
    two different jobs never both proceed; in a close race both may refuse (rerun one).
    """
    if not owner or not all(c.isalnum() or c in "-_" for c in owner):
        raise ValueError(f"claim owner {owner!r}: letters, digits, '-' and '_' only")
    body = json.dumps({"owner": owner, "note": note, "host": socket.gethostname(), "pid": os.getpid(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
    if not is_remote(prefix):
        return _claim_local(prefix, owner, body)
    mine = join(prefix, CLAIMS_REMOTE, f"{owner}-{secrets.token_hex(8)}")
    write_bytes(mine, body)
    others = [u for u in listdir(join(prefix, CLAIMS_REMOTE)) if not basename(u).startswith(owner + "-")]
    if others:
        release(mine)
        raise _claimed(prefix, others[0])
    return mine


def _claim_local(prefix: str, owner: str, body: bytes) -> str | None:
    path = os.path.join(local_path(prefix), CLAIM_LOCAL)
    url = join(prefix, CLAIM_LOCAL)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        if _claim_body(url).get("owner") == owner:
            return None
        raise _claimed(prefix, url) from None
    with os.fdopen(fd, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    return url


def _claim_body(url: str) -> dict:
    """A claim's content; {} when it cannot be read (e.g. a local claim still being written)."""
    try:
        body = json.loads(read_bytes(url))
        return body if isinstance(body, dict) else {}
    except (ValueError, FileNotFoundError):
        return {}


def _claimed(prefix: str, other: str) -> PrefixClaimed:
    body = _claim_body(other)
    who = body.get("note") or "unknown job"
    where = f" on {body['host']} (pid {body.get('pid')}, since {body.get('time')})" if "host" in body else ""
    return PrefixClaimed(f"{redact(prefix)} belongs to another job ({who}{where}; claim {redact(other)}): "
                         "choose another output location, or delete that claim if its job is gone")


def release(claim_url: str | None) -> None:
    """Give up a claim made by :func:`claim` (for a job that refuses to run after claiming)."""
    if claim_url is not None:
        remove(claim_url)
