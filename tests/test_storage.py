"""storage.py against local disk and a real S3 server (rclone on loopback)."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from adpm_dist.io import backend as storage_backend
from adpm_dist.io import storage
from tests.s3_server import FaultProxy

pytestmark = pytest.mark.timeout(120)


def _on_disk(server, url: str) -> Path:
    """Where rclone keeps an object: the independent truth for what the server stored."""
    return server.root / url[len("s3://") :]


# ----------------------------------------------------------------------------- local


@pytest.mark.parametrize("as_file_url", [False, True])
def test_local_roundtrip(tmp_path: Path, as_file_url: bool):
    base = f"file://{tmp_path}" if as_file_url else str(tmp_path)
    assert not storage.is_remote(base)
    url = storage.join(base, "a", "b.bin")
    assert not storage.exists(url)
    storage.write_bytes(url, b"\x00\x01payload")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01payload"
    assert storage.read_bytes(url) == b"\x00\x01payload"
    storage.write_text(storage.join(base, "a", "c.txt"), "héllo")
    assert storage.read_text(storage.join(base, "a", "c.txt")) == "héllo"
    with storage.open_read(url) as f:
        assert f.read(2) == b"\x00\x01"
    assert storage.listdir(storage.join(base, "a")) == [
        storage.join(base, "a", "b.bin"),
        storage.join(base, "a", "c.txt"),
    ]
    assert storage.glob(storage.join(base, "a", "*.txt")) == [storage.join(base, "a", "c.txt")]
    storage.remove(url)
    storage.remove(url)  # missing is fine
    assert not storage.exists(url)
    storage.makedirs(storage.join(base, "x", "y"))
    assert (tmp_path / "x" / "y").is_dir()
    # Files get the normal permissions of the umask, not mkstemp's 0600.
    mode = (tmp_path / "a" / "c.txt").stat().st_mode & 0o777
    assert mode == 0o666 & ~storage._UMASK


def test_local_atomic_write_leaves_old_content_on_failure(tmp_path: Path):
    url = str(tmp_path / "model.bin")
    storage.write_bytes(url, b"old")
    with pytest.raises(RuntimeError, match="crash"):
        with storage.open_write(url) as f:
            f.write(b"new partial")
            raise RuntimeError("crash mid-write")
    assert storage.read_bytes(url) == b"old"
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]  # no temporary left behind
    with storage.open_write(url) as f:
        f.write(b"new")
    assert storage.read_bytes(url) == b"new"


def test_join_dirname_and_schemes():
    assert storage.join("s3://b/x", "y", "z.tar") == "s3://b/x/y/z.tar"
    assert storage.dirname("s3://b/x/y.tar") == "s3://b/x"
    assert storage.join("file:///tmp/a", "b") == "file:///tmp/a/b"
    assert storage.is_remote("s3://b/k") and not storage.is_remote("/tmp/x")
    with pytest.raises(storage.StorageError, match="unsupported URL scheme 'gs'"):
        storage.exists("gs://bucket/key")


# ----------------------------------------------------------------------------- S3


def test_s3_roundtrip(s3_server, s3_bucket: str):
    url = storage.join(s3_bucket, "run", "gamma.npz")
    assert storage.is_remote(url)
    assert not storage.exists(url)
    payload = os.urandom(100_000)
    storage.write_bytes(url, payload)
    assert _on_disk(s3_server, url).read_bytes() == payload  # the server really stored it
    assert storage.read_bytes(url) == payload
    assert storage.exists(url)
    storage.write_text(storage.join(s3_bucket, "run", "cfg.yaml"), "a: 1\n")
    assert storage.listdir(storage.join(s3_bucket, "run")) == [
        f"{s3_bucket}/run/cfg.yaml",
        f"{s3_bucket}/run/gamma.npz",
    ]
    assert storage.glob(f"{s3_bucket}/run/*.npz") == [url]
    assert storage.glob(f"{s3_bucket}/run/*.nothing") == []
    with storage.open_read(url) as f:
        assert f.read(10) == payload[:10]
    storage.makedirs(storage.join(s3_bucket, "no", "folders"))  # no-op, no error
    storage.remove(url)
    storage.remove(url)
    assert not storage.exists(url) and not _on_disk(s3_server, url).exists()


def test_s3_aborted_stream_leaves_no_object(s3_server, s3_bucket: str):
    """A writer that crashes after several multipart chunks leaves nothing under the key."""
    url = storage.join(s3_bucket, "ckpt", "big.bin")
    with pytest.raises(RuntimeError):
        with storage.open_write(url) as f:
            f.write(os.urandom(12 << 20))  # > s3fs's 5 MiB block: multipart parts were sent
            raise RuntimeError("killed")
    assert not storage.exists(url)
    assert not _on_disk(s3_server, url).exists()
    blob = os.urandom(12 << 20)
    with storage.open_write(url) as f:
        f.write(blob)
    assert _on_disk(s3_server, url).read_bytes() == blob


def test_upload_download_dir(tmp_path: Path, s3_bucket: str):
    src = tmp_path / "stage"
    (src / "global_step3" / "sub").mkdir(parents=True)
    (src / "latest").write_text("global_step3")
    (src / "global_step3" / "model.pt").write_bytes(os.urandom(3000))
    (src / "global_step3" / "sub" / "opt.pt").write_bytes(os.urandom(10))
    url = storage.join(s3_bucket, "ckpt")
    written = storage.upload_dir(str(src), url)
    assert sorted(written) == sorted(
        f"{url}/{p}" for p in ("latest", "global_step3/model.pt", "global_step3/sub/opt.pt")
    )
    dst = tmp_path / "restored"
    storage.download_dir(url, str(dst))
    for p in ("latest", "global_step3/model.pt", "global_step3/sub/opt.pt"):
        assert (dst / p).read_bytes() == (src / p).read_bytes()
    with pytest.raises(FileNotFoundError, match="ckpt-missing"):
        storage.download_dir(storage.join(s3_bucket, "ckpt-missing"), str(tmp_path / "x"))


def test_missing_bucket_is_named(s3_server, s3_bucket: str):
    url = "s3://no-such-bucket-here/data/x.tar"
    with pytest.raises(storage.StorageNotFound, match="bucket 'no-such-bucket-here' does not exist"):
        storage.read_bytes(url)
    with pytest.raises(storage.StorageNotFound, match="no-such-bucket-here"):
        storage.check_access(url)
    with pytest.raises(storage.StorageNotFound, match=r"s3://.*/absent.bin: not found"):
        storage.read_bytes(storage.join(s3_bucket, "absent.bin"))


@pytest.mark.parametrize("which", ["secret", "key"])
def test_wrong_credentials_are_refused_and_never_printed(s3_server, s3_bucket: str, monkeypatch, which: str):
    url = storage.join(s3_bucket, "x.bin")
    storage.write_bytes(url, b"secret data")
    wrong = "WRONGwrongWRONG0123456789" if which == "secret" else "AKWRONGKEY000"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY" if which == "secret" else "AWS_ACCESS_KEY_ID", wrong)
    storage.clear_cache()
    for op in (
        lambda: storage.check_access(url),
        lambda: storage.read_bytes(url),
        lambda: storage.exists(url),  # must raise, not pretend the object is absent
        lambda: storage.write_bytes(storage.join(s3_bucket, "new.bin"), b"x"),
    ):
        with pytest.raises(storage.StorageAccessDenied) as info:
            op()
        message = str(info.value)
        assert s3_bucket in message and "access denied" in message
        assert "AWS_ACCESS_KEY_ID" in message  # tells the user what to check
        for secret in (wrong, s3_server.secret, s3_server.key):
            assert secret not in message
    assert not _on_disk(s3_server, storage.join(s3_bucket, "new.bin")).exists()


def test_configure_overrides_environment(s3_server, s3_bucket: str, monkeypatch):
    url = storage.join(s3_bucket, "cfg.bin")
    storage.write_bytes(url, b"1")
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9" if var == "AWS_ENDPOINT_URL" else "bogus")
    storage.configure(endpoint_url=s3_server.endpoint, key=s3_server.key, secret=s3_server.secret)
    try:
        assert storage.read_bytes(url) == b"1"
    finally:
        storage.configure(endpoint_url=None, key=None, secret=None)


def _child_reads(url: str, parent_key: tuple, queue) -> None:
    try:
        inherited = storage_backend._cache.get(parent_key)
        fs = storage.filesystem(url)
        queue.put((inherited is not None, fs is not inherited, storage.read_bytes(url)))
    except Exception as exc:  # noqa: BLE001 - report to the parent
        queue.put(("error", repr(exc), b""))


def test_forked_child_builds_its_own_client(s3_bucket: str):
    url = storage.join(s3_bucket, "fork.bin")
    storage.write_bytes(url, b"from parent")
    parent_fs = storage.filesystem(url)
    assert storage.filesystem(url) is parent_fs  # one per process
    parent_key = next(k for k, v in storage_backend._cache.items() if v is parent_fs)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_reads, args=(url, parent_key, queue))
    proc.start()
    result = queue.get(timeout=60)
    proc.join(30)
    assert result == (True, True, b"from parent")  # parent's client was there, not reused


# ----------------------------------------------------------------------------- retries


def test_transient_errors_are_retried_with_backoff(s3_server, s3_bucket: str, monkeypatch):
    url = storage.join(s3_bucket, "flaky.bin")
    storage.write_bytes(url, b"eventually")
    with FaultProxy(s3_server.endpoint, failures=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage.configure(retries=4, retry_base_delay_s=0.01)
        try:
            assert storage.read_bytes(url) == b"eventually"
        finally:
            storage.configure(retries=5, retry_base_delay_s=0.2)
        assert proxy.faults == 3 and proxy.requests > 3  # all 3 failures consumed, then real requests


def test_each_retry_is_one_warning_line_without_credentials(s3_server, s3_bucket: str, monkeypatch, capsys):
    """A stalled store is visible: ``warning: URL: error, retry k/n in Xs`` per retry, on stderr."""
    import re

    url = storage.join(s3_bucket, "stall.bin")
    storage.write_bytes(url, b"after the stall")
    with FaultProxy(s3_server.endpoint, failures=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage.configure(retries=5, retry_base_delay_s=0.01)
        try:
            capsys.readouterr()
            assert storage.read_bytes(url) == b"after the stall"
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 3, lines  # one line per retry, none for the success
            for k, line in enumerate(lines, start=1):
                what = r"HTTP 503 Service Unavailable( \(SlowDown: Please reduce\))?"  # HEAD: no body
                want = rf"warning: {url}: {what}, retry {k}/4 in \d+\.\ds"
                assert re.fullmatch(want, line), line
                assert s3_server.secret not in line and s3_server.key not in line
            proxy.failures = 10**6
            storage.configure(retries=3, retry_base_delay_s=0.01)
            with pytest.raises(storage.StorageError, match=f"read {url}"):
                storage.read_bytes(url)
            lines = capsys.readouterr().err.strip().splitlines()
            assert [line.split(", retry ")[1].split(" ")[0] for line in lines] == ["1/2", "2/2"]
        finally:
            storage.configure(retries=5, retry_base_delay_s=0.2)


def test_persistent_errors_fail_with_the_url_and_refusals_are_not_retried(
    s3_server, s3_bucket: str, monkeypatch
):
    url = storage.join(s3_bucket, "down.bin")
    with FaultProxy(s3_server.endpoint, failures=10**6) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        try:
            for attempts in (1, 2):
                storage.configure(retries=attempts, retry_base_delay_s=0.01)
                proxy.requests = proxy.faults = 0
                with pytest.raises(storage.StorageError, match=f"read {url}: .*Service Unavailable"):
                    storage.read_bytes(url)
                assert proxy.requests == attempts, proxy.log  # one layer: exactly `attempts` requests
            proxy.failures = 0
            proxy.requests = 0
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
            storage.clear_cache()
            with pytest.raises(storage.StorageAccessDenied):
                storage.read_bytes(url)
            assert proxy.requests == 1  # a refusal is final: no retry storm against the server
        finally:
            storage.configure(retries=5, retry_base_delay_s=0.2)


# ----------------------------------------------------------------------------- s3_local.sh


@pytest.mark.s3  # starts its own rclone server, without the s3_server fixture
@pytest.mark.timeout(60)
def test_s3_local_script_start_env_stop(tmp_path: Path):
    import socket
    import subprocess

    script = Path(__file__).resolve().parent.parent / "tools" / "s3_local.sh"
    root = tmp_path / "served"
    start = subprocess.run(
        ["bash", str(script), "start", str(root)], capture_output=True, text=True, timeout=30, check=True
    )
    try:
        exports = dict(
            line[len("export ") :].split("=", 1)
            for line in start.stdout.splitlines()
            if line.startswith("export ")
        )
        assert set(exports) == {
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        }
        assert exports["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        pid = int((tmp_path / "served.s3_local" / "pid").read_text())
        os.kill(pid, 0)  # alive
        # The keys are not on rclone's command line (anyone can read /proc/*/cmdline).
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert exports["AWS_SECRET_ACCESS_KEY"] not in cmdline
        again = subprocess.run(
            ["bash", str(script), "env", str(root)], capture_output=True, text=True, timeout=10, check=True
        )
        assert again.stdout == start.stdout
        port = int(exports["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
        socket.create_connection(("127.0.0.1", port), 2).close()
    finally:
        subprocess.run(["bash", str(script), "stop", str(root)], timeout=30, check=True, capture_output=True)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (tmp_path / "served.s3_local" / "pid").exists()
