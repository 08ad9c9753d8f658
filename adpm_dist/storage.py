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
- **Retries with backoff** on transient errors (connection resets, timeouts, 5xx,
  throttling). Missing objects, missing buckets and refused credentials are not transient
  and fail at once with a message naming the URL.
"""

from __future__ import annotations

import contextlib
import glob as _pyglob
import os
import posixpath
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

import fsspec

T = TypeVar("T")

_REMOTE_SCHEMES = ("s3",)
_LOCAL_SCHEMES = ("", "file")


class StorageError(OSError):
    """A storage operation failed; the message names the URL (never the credentials)."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object, folder or bucket does not exist."""


class StorageAccessDenied(StorageError, PermissionError):
    """The server refused the request (wrong or missing credentials, or no permission)."""


# ----------------------------------------------------------------------------- configuration

_overrides: dict[str, str | None] = {"endpoint_url": None, "key": None, "secret": None}
_retry_policy = {"attempts": 5, "base_delay_s": 0.2, "max_delay_s": 5.0, "client_attempts": 3}
_cache: dict[tuple, fsspec.AbstractFileSystem] = {}
_cache_lock = threading.Lock()


def configure(
    endpoint_url: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    *,
    retries: int | None = None,
    retry_base_delay_s: float | None = None,
    client_attempts: int | None = None,
) -> None:
    """Override the S3 endpoint/keys taken from the environment (None keeps the env value).

    ``retries`` is the total number of attempts of an operation on a transient failure;
    ``client_attempts`` the attempts botocore makes per HTTP request inside each (default
    3). Cached filesystems are dropped so that the next call uses the new settings.
    """
    _overrides.update(endpoint_url=endpoint_url, key=key, secret=secret)
    if retries is not None:
        _retry_policy["attempts"] = max(1, int(retries))
    if retry_base_delay_s is not None:
        _retry_policy["base_delay_s"] = float(retry_base_delay_s)
    if client_attempts is not None:
        _retry_policy["client_attempts"] = max(1, int(client_attempts))
    clear_cache()


def clear_cache() -> None:
    """Forget every cached filesystem (the next call creates fresh clients)."""
    with _cache_lock:
        _cache.clear()


def _s3_settings() -> dict[str, str | None]:
    env = os.environ
    return {
        "endpoint_url": _overrides["endpoint_url"] or env.get("AWS_ENDPOINT_URL") or None,
        "key": _overrides["key"] or env.get("AWS_ACCESS_KEY_ID") or None,
        "secret": _overrides["secret"] or env.get("AWS_SECRET_ACCESS_KEY") or None,
    }


def _secrets() -> list[str]:
    """Credential strings that must never be printed."""
    s = _s3_settings()
    values = [s["key"], s["secret"], os.environ.get("AWS_SESSION_TOKEN")]
    return [v for v in values if v and len(v) >= 4]


def redact(text: str) -> str:
    """Replace every configured credential in ``text`` with ``***``."""
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


# ----------------------------------------------------------------------------- URLs


def scheme(url: str) -> str:
    """'s3', 'file' or '' (plain path). Windows-style drive letters are not supported."""
    return urlparse(str(url)).scheme if "://" in str(url) else ""


def is_remote(url: str) -> bool:
    """True for object-store URLs (s3://), False for plain paths and file://."""
    return scheme(url) in _REMOTE_SCHEMES


def _check_scheme(url: str) -> str:
    s = scheme(url)
    if s not in _REMOTE_SCHEMES + _LOCAL_SCHEMES:
        raise StorageError(f"{url}: unsupported URL scheme {s!r} (use a path, file:// or s3://)")
    return s


def local_path(url: str) -> str:
    """The filesystem path of a plain path or file:// URL."""
    s = _check_scheme(url)
    if s == "s3":
        raise StorageError(f"{url}: not a local path")
    return str(url)[len("file://") :] if s == "file" else os.fspath(url)


def _fs_path(url: str) -> str:
    """The path fsspec expects: 'bucket/key' for s3, an absolute-or-relative path locally."""
    s = _check_scheme(url)
    if s == "s3":
        return str(url)[len("s3://") :]
    return local_path(url)


def _to_url(like: str, path: str) -> str:
    """Turn an fsspec path back into a URL of the same kind as ``like``."""
    s = scheme(like)
    if s == "s3":
        return "s3://" + path.lstrip("/")
    if s == "file":
        return "file://" + path
    return path


def join(url: str, *parts: str) -> str:
    """Join path components onto a path or URL ('s3://b/x', 'y' -> 's3://b/x/y')."""
    if scheme(url) == "":
        return os.path.join(url, *parts)
    return posixpath.join(str(url), *parts)


def dirname(url: str) -> str:
    """The parent folder of a path or URL."""
    if scheme(url) == "":
        return os.path.dirname(url)
    head, _, path = str(url).partition("://")
    return f"{head}://{posixpath.dirname(path.rstrip('/'))}"


def basename(url: str) -> str:
    return posixpath.basename(str(url).rstrip("/"))


# ----------------------------------------------------------------------------- filesystems


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    """The filesystem for ``url``, created lazily once per process (and per S3 settings)."""
    s = _check_scheme(url)
    protocol = "s3" if s == "s3" else "file"
    settings = _s3_settings() if protocol == "s3" else {}
    cache_key = (os.getpid(), protocol, tuple(sorted(settings.items())))
    with _cache_lock:
        fs = _cache.get(cache_key)
        if fs is None:
            fs = _make_filesystem(protocol, settings)
            _cache[cache_key] = fs
    return fs


_sessions: dict[tuple, Any] = {}


def _shared_session(settings: dict) -> Any:
    """An aiobotocore session with the S3 service model loaded, shared across forks.

    A session is plain data (service models, config; no sockets, no event loop), so a
    forked DataLoader worker may reuse its parent's: that saves each worker ~0.1 s of JSON
    loading per epoch. Clients and connections are still created per process.
    """
    key = tuple(sorted(settings.items()))
    session = _sessions.get(key)
    if session is None:
        from aiobotocore.session import AioSession

        session = AioSession()
        loader = session.get_component("data_loader")
        loader.load_service_model("s3", "service-2")  # the big JSON model, cached by loader
        loader.load_data("endpoints")
        _sessions[key] = session
    return session


def _quiet_client_debug_logs() -> None:
    """botocore's DEBUG records print signed headers (the access key id) and request dumps.

    Cap the S3 client libraries at INFO so that a job run with root logging at DEBUG does
    not write credentials into its logs. A level someone set explicitly is left alone.
    """
    import logging

    for name in ("botocore", "aiobotocore", "s3fs", "urllib3"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


def _make_filesystem(protocol: str, settings: dict) -> fsspec.AbstractFileSystem:
    if protocol == "file":
        return fsspec.filesystem("file", skip_instance_cache=True)
    _quiet_client_debug_logs()
    import s3fs  # deferred: importing botocore costs ~0.3 s and local-only runs never need it

    client_kwargs = {}
    session = _shared_session(settings)
    if settings["endpoint_url"]:
        client_kwargs["endpoint_url"] = settings["endpoint_url"]
    fs = s3fs.S3FileSystem(
        session=session,
        key=settings["key"],
        secret=settings["secret"],
        client_kwargs=client_kwargs,
        # Retry layers multiply. botocore retries throttling/5xx 3 times per request (this also
        # covers the ranged GETs of streaming reads, which our wrapper cannot see); s3fs's own
        # retry loop is switched off (1 attempt); our wrapper adds backoff on top.
        config_kwargs={"retries": {"mode": "standard", "max_attempts": _retry_policy["client_attempts"]}},
        skip_instance_cache=True,  # a fresh client per process, never a parent's
        use_listings_cache=False,  # other ranks write concurrently: never trust stale listings
    )
    fs.retries = 1  # a class attribute in s3fs, not a constructor argument
    return fs


# ----------------------------------------------------------------------------- errors, retries

_TRANSIENT_WORDS = (
    "slowdown",
    "slow down",
    "service unavailable",
    "internal error",
    "internalerror",
    "bad gateway",
    "gateway timeout",
    "throttl",
    "timed out",
    "timeout",
    "connection reset",
    "connection refused",
    "connection aborted",
    "could not connect",
    "server disconnected",
    "requesttimeout",
    "serviceunavailable",
)


def _is_transient(exc: BaseException) -> bool:
    permanent = FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError
    if isinstance(exc, permanent):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    name = type(exc).__name__.lower()
    if any(w in name for w in ("timeout", "connection", "endpoint", "throttl")):
        return True
    text = str(exc).lower()
    return any(w in text for w in _TRANSIENT_WORDS)


def _wrap(exc: BaseException, url: str, op: str) -> StorageError:
    """A clear, credential-free error that names the URL and the operation."""
    if isinstance(exc, StorageError):
        return exc
    reason = redact(str(exc) or type(exc).__name__)
    if isinstance(exc, PermissionError):
        hint = ""
        if is_remote(url):
            hint = (
                " — the server refused the request: check AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY (or storage.configure) and the bucket's permissions"
            )
        return StorageAccessDenied(f"{op} {url}: access denied ({reason}){hint}")
    if isinstance(exc, FileNotFoundError):
        if "bucket does not exist" in reason.lower() or "nosuchbucket" in reason.lower():
            bucket = _fs_path(url).split("/", 1)[0]
            return StorageNotFound(f"{op} {url}: bucket {bucket!r} does not exist")
        return StorageNotFound(f"{op} {url}: not found")
    return StorageError(f"{op} {url}: {type(exc).__name__}: {reason}")


def _call(op: str, url: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` with retries on transient errors; wrap every failure in a StorageError."""
    attempts = int(_retry_policy["attempts"])
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised wrapped
            if attempt < attempts and _is_transient(exc):
                delay = min(
                    _retry_policy["max_delay_s"],
                    _retry_policy["base_delay_s"] * 2 ** (attempt - 1),
                )
                time.sleep(delay * (0.5 + random.random()))  # jitter: ranks don't retry in step
                continue
            raise _wrap(exc, url, op) from None
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- reading


def exists(url: str) -> bool:
    """True if an object/file or folder exists at ``url``. Refused credentials raise."""
    fs = filesystem(url)
    return _call("exists", url, lambda: fs.exists(_fs_path(url)))


def isdir(url: str) -> bool:
    fs = filesystem(url)
    return _call("isdir", url, lambda: fs.isdir(_fs_path(url)))


def size(url: str) -> int:
    fs = filesystem(url)
    return int(_call("size", url, lambda: fs.size(_fs_path(url))))


def read_bytes(url: str) -> bytes:
    fs = filesystem(url)
    return _call("read", url, lambda: fs.cat_file(_fs_path(url)))


def read_text(url: str, encoding: str = "utf-8") -> str:
    return read_bytes(url).decode(encoding)


@contextlib.contextmanager
def open_read(url: str) -> Iterator[IO[bytes]]:
    """Open ``url`` for streaming binary reads (opening is retried; reads are not)."""
    fs = filesystem(url)
    f = _call("open", url, lambda: fs.open(_fs_path(url), "rb"))
    try:
        yield f
    finally:
        f.close()


def listdir(url: str) -> list[str]:
    """Full URLs of the entries directly under ``url`` (sorted)."""
    if not is_remote(url):
        path = local_path(url)
        names = _call("list", url, lambda: os.listdir(path))
        return sorted(join(url, n) for n in names)
    fs = filesystem(url)
    path = _fs_path(url).rstrip("/")
    entries = _call("list", url, lambda: fs.ls(path, detail=False))
    out = sorted(_to_url(url, e) for e in entries)
    # s3fs lists a key "dir/" as the folder itself; never return the folder as its own entry.
    return [e for e in out if e.rstrip("/") != str(url).rstrip("/")]


def glob(pattern: str) -> list[str]:
    """Full URLs matching a shell-style pattern (sorted; empty list when nothing matches)."""
    if not is_remote(pattern):
        found = _pyglob.glob(local_path(pattern))
        return sorted(found if scheme(pattern) == "" else ["file://" + p for p in found])
    fs = filesystem(pattern)
    found = _call("glob", pattern, lambda: fs.glob(_fs_path(pattern)))
    return sorted(_to_url(pattern, p) for p in found)


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
    base = _fs_path(url).rstrip("/")
    found = _call("find", url, lambda: fs.find(base))
    return sorted(_to_url(url, p) for p in found)


def check_access(url: str) -> None:
    """Fail early, naming the URL, if the server refuses us or the bucket does not exist.

    Call this before any work starts (writers, long jobs): a wrong key or a misspelt
    bucket should stop a job in its first second, not after an hour of compute.
    """
    if not is_remote(url):
        return
    bucket = _fs_path(url).split("/", 1)[0]
    fs = filesystem(url)
    _call("access", url, lambda: fs.ls(bucket, detail=False))


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
        _call("write", url, lambda: fs.pipe_file(_fs_path(url), bytes(data)))
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
        f = _call("open", url, lambda: fs.open(_fs_path(url), "wb"))
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # aborts the multipart upload; nothing becomes visible
                f.closed = True  # so fsspec's __del__ does not try to finish the upload
            raise
        _call("write", url, f.close)
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
    path = _fs_path(url)

    def _rm() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    _call("remove", url, _rm)


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
                _call("upload", dst, lambda f=fs, s=src, d=dst: f.put_file(s, _fs_path(d)))
            else:
                copy_file(src, dst)
            written.append(dst)
    return written


def download_dir(url: str, local_dir: str) -> list[str]:
    """Copy every file below ``url`` into ``local_dir`` (each file atomically); returns paths."""
    files = walk_files(url)
    if not files and not exists(url):
        raise StorageNotFound(f"download {url}: not found")
    base = _fs_path(url).rstrip("/")
    out = []
    for src in files:
        rel = _fs_path(src)[len(base) :].lstrip("/")
        dst = os.path.join(local_dir, *rel.split("/"))
        copy_file(src, dst)
        out.append(dst)
    return out
