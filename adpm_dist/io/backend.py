"""What :mod:`adpm_dist.io.storage` stands on: URLs, S3 settings, one filesystem per process, retries.

- URLs: plain paths, ``file://`` and ``s3://``; :func:`fs_path` turns one into the path
  fsspec expects and :func:`to_url` turns it back.
- Settings: the S3 endpoint and keys from the standard AWS variables, overridable with
  :func:`configure`; :func:`redact` scrubs them from any text.
- :func:`filesystem`: created lazily, cached per PID (a forked DataLoader worker builds
  its own client instead of inheriting its parent's connection pool and event loop).
- **One retry layer: botocore's request loop.** Every S3 HTTP request goes through it,
  including the ones no wrapper around our calls can see (the ranged GETs of a streaming
  read, the parts of a multipart upload), so that is where retries are decided, once per
  request: :func:`_needs_retry` answers botocore's ``needs-retry`` event with botocore's own
  typed standard-mode conditions (HTTP 500/502/503/504, throttling and timeout error codes,
  connection exception classes; never message text), ``attempts`` tries in all, with
  exponential backoff and jitter, and one ``warning:`` line on stderr per retry. botocore's
  built-in handler gets one attempt and s3fs's loop one try, so retries never multiply.
  What the loop does not see is not retried: a connection cut after a response's headers
  (mid-body) and local file errors; both fail at once, naming the URL.
- :func:`run_op`: every failure becomes a :class:`StorageError` that names the operation
  and URL and never the credentials (it does not retry).
"""

from __future__ import annotations

import http
import os
import posixpath
import random
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar
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
_retry_policy = {"attempts": 5, "base_delay_s": 0.2, "max_delay_s": 5.0}
_cache: dict[tuple, fsspec.AbstractFileSystem] = {}
_cache_lock = threading.Lock()


def configure(
    endpoint_url: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    *,
    retries: int | None = None,
    retry_base_delay_s: float | None = None,
) -> None:
    """Override the S3 endpoint/keys taken from the environment (None keeps the env value).

    ``retries`` is the number of attempts of one S3 request on a transient failure (default
    5; 1 = no retry), ``retry_base_delay_s`` the first backoff (doubling, capped at 5 s).
    Cached filesystems are dropped so that the next call uses the new settings.
    """
    _overrides.update(endpoint_url=endpoint_url, key=key, secret=secret)
    if retries is not None:
        _retry_policy["attempts"] = max(1, int(retries))
    if retry_base_delay_s is not None:
        _retry_policy["base_delay_s"] = float(retry_base_delay_s)
    clear_cache()


def clear_cache() -> None:
    """Forget every cached filesystem (the next call creates fresh clients)."""
    with _cache_lock:
        _cache.clear()


_WORKER_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


def settings_snapshot() -> dict[str, Any]:
    """This process's S3 settings (environment, :func:`configure` overrides, retry policy), for a
    process that does not inherit them: a DataLoader worker started by forkserver or spawn."""
    return {"env": {k: os.environ[k] for k in _WORKER_ENV if k in os.environ},
            "overrides": dict(_overrides), "retry": dict(_retry_policy)}


def apply_settings(snapshot: dict[str, Any]) -> None:
    """Adopt a :func:`settings_snapshot` (in the worker), with fresh clients."""
    for k in _WORKER_ENV:
        os.environ.pop(k, None)
    os.environ.update(snapshot["env"])
    _overrides.update(snapshot["overrides"])
    _retry_policy.update(snapshot["retry"])
    clear_cache()


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


def fs_path(url: str) -> str:
    """The path fsspec expects: 'bucket/key' for s3, an absolute-or-relative path locally."""
    s = _check_scheme(url)
    if s == "s3":
        return str(url)[len("s3://") :]
    return local_path(url)


def to_url(like: str, path: str) -> str:
    """Turn an fsspec path back into a URL of the same kind as ``like``."""
    s = scheme(like)
    if s == "s3":
        return "s3://" + path.lstrip("/")
    if s == "file":
        return "file://" + path
    return path


def canonical(url: str) -> str:
    """One spelling per location, for comparing what determines a job's result: local paths
    (plain or file://) become absolute and normalised; s3 URLs lose doubled and trailing
    slashes. Credentials, if any were embedded, are not part of it (see :func:`redact`)."""
    if is_remote(url):
        head, key = str(url).split("://", 1)
        return f"{head}://" + "/".join(part for part in key.split("/") if part)
    return os.path.abspath(local_path(url))


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
        # The one retry layer (module docstring): ours come before the client's own handlers.
        session.register("before-parameter-build.s3", _remember_url)
        session.register("needs-retry.s3", _needs_retry)
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
        # Retry layers multiply: botocore's built-in handler makes 1 attempt, so _needs_retry
        # (registered on the session) is the only one that retries. ("max_attempts" would
        # count retries only: botocore adds 1 to it.)
        config_kwargs={"retries": {"mode": "standard", "total_max_attempts": 1}},
        skip_instance_cache=True,  # a fresh client per process, never a parent's
        use_listings_cache=False,  # other ranks write concurrently: never trust stale listings
    )
    fs.retries = 1  # s3fs's own loop (substring-matched): off. A class attribute, not an argument
    return fs


# ----------------------------------------------------------------------------- errors, retries

def _remember_url(params: dict, context: dict, **_: Any) -> None:
    """``before-parameter-build``: note the s3:// URL a request is about, for warning lines."""
    key = params.get("Key") or params.get("Prefix") or ""
    context["storage_url"] = f"s3://{params.get('Bucket', '')}/{key}".rstrip("/")


def _needs_retry(response: Any, attempts: int, caught_exception: BaseException | None,
                 request_dict: dict, operation: Any, **_: Any) -> float | None:
    """botocore's ``needs-retry`` event after each try of a request: the delay before the next
    try (botocore sleeps, then retries), or None to stop and return or raise the last result.

    The decision is botocore's typed standard-mode conditions, not message text.
    """
    from botocore.retries import standard

    context = standard.RetryEventAdapter().create_retry_context(
        response=response, attempts=attempts, caught_exception=caught_exception,
        request_dict=request_dict, operation=operation)
    total = int(_retry_policy["attempts"])
    transient = standard.OrRetryChecker([
        standard.TransientRetryableChecker(), standard.ThrottledRetryableChecker()])
    if attempts >= total or not transient.is_retryable(context):
        return None
    delay = min(_retry_policy["max_delay_s"], _retry_policy["base_delay_s"] * 2 ** (attempts - 1))
    delay *= 0.5 + random.random()  # jitter: ranks don't retry in step
    url = request_dict.get("context", {}).get("storage_url", "s3://")
    print(f"warning: {redact(url)}: {_failure(context)}, retry {attempts}/{total - 1} in {delay:.1f}s",
          file=sys.stderr, flush=True)
    return delay


def _failure(context: Any) -> str:
    """What went wrong with one try, for a warning line: the exception, or the HTTP status."""
    if context.caught_exception is not None:
        return _kind(context.caught_exception)
    status = context.http_response.status_code
    try:
        text = f"HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        text = f"HTTP {status}"
    error = (context.parsed_response or {}).get("Error") or {}
    if error.get("Code") in (None, "", str(status)):  # no body (HEAD): botocore made one up
        return text
    detail = ": ".join(str(v) for v in (error.get("Code"), error.get("Message")) if v)
    return f"{text} ({redact(detail)[:100]})"


def _wrap(exc: BaseException, url: str, op: str) -> StorageError:
    """A clear, credential-free error that names the URL and the operation."""
    if isinstance(exc, StorageError):
        return exc
    reason = redact(str(exc) or type(exc).__name__)
    if type(exc).__name__.endswith("CredentialsError"):
        # botocore's NoCredentialsError/PartialCredentialsError: no key pair, or half of one
        return StorageAccessDenied(f"{op} {url}: no usable S3 credentials ({reason}) — set both "
                                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or storage.configure)")
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
            bucket = fs_path(url).split("/", 1)[0]
            return StorageNotFound(f"{op} {url}: bucket {bucket!r} does not exist")
        return StorageNotFound(f"{op} {url}: not found")
    return StorageError(f"{op} {url}: {type(exc).__name__}: {reason}")


def _kind(exc: BaseException) -> str:
    """A short, credential-free description of an error for a warning line."""
    text = " ".join(redact(str(exc)).split())
    return f"{type(exc).__name__}: {text[:100]}" if text else type(exc).__name__


def run_op(op: str, url: str, fn: Callable[[], T]) -> T:
    """Run ``fn``, turning any failure into a StorageError naming ``op`` and ``url``.

    No retries here: botocore's request loop retries each S3 request (module docstring).
    """
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - re-raised wrapped
        raise _wrap(exc, url, op) from None
