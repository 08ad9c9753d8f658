"""The one retry layer of storage (adpm_dist/io/backend.py), counted at the server's door.

Every test talks to the real rclone S3 server through :class:`tests.s3_server.FaultProxy`,
which injects the fault and counts the requests that reach it: the number of attempts is
what the server saw, not what the client says it did.
"""

from __future__ import annotations

import os
import re
import socket

import pytest

from adpm_dist.io import storage
from tests.s3_server import FaultProxy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fast_retries():
    yield lambda attempts: storage.configure(retries=attempts, retry_base_delay_s=0.01)
    storage.configure(retries=5, retry_base_delay_s=0.2)


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


@pytest.mark.parametrize("attempts", [1, 3])
@pytest.mark.parametrize("op", ["read", "write", "list"])
def test_a_failing_call_makes_exactly_the_configured_attempts(
    s3_server, s3_bucket: str, monkeypatch, capsys, fast_retries, op: str, attempts: int
):
    url = storage.join(s3_bucket, "dir", "x.bin")
    calls = {
        "read": lambda: storage.read_bytes(url),
        "write": lambda: storage.write_bytes(url, b"payload"),
        "list": lambda: storage.listdir(storage.join(s3_bucket, "dir")),
    }
    with FaultProxy(s3_server.endpoint, failures=10**6) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        fast_retries(attempts)
        capsys.readouterr()
        with pytest.raises(storage.StorageError, match=f"{op} s3://{s3_bucket[5:]}/dir"):
            calls[op]()
    assert proxy.requests == attempts, proxy.log  # not attempts × botocore's × s3fs's
    assert len(set(proxy.log)) == 1  # the same request, tried again
    assert len(_warnings(capsys)) == attempts - 1


def test_the_decision_is_typed_not_read_from_the_message(
    s3_server, s3_bucket: str, monkeypatch, capsys, fast_retries
):
    """A 400 whose text reads "connection reset, timed out; slow down" is final: one request."""
    url = storage.join(s3_bucket, "x.bin")
    storage.write_bytes(url, b"x")
    # GET only: its error has a body (a HEAD's has none), so the text reaches the error message.
    with FaultProxy(s3_server.endpoint, failures=10**6, fault="bad-request", methods={"GET"}) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        fast_retries(5)
        capsys.readouterr()
        with pytest.raises(storage.StorageError, match=f"read {url}: .*slow down"):
            storage.read_bytes(url)
    assert proxy.faults == 1, proxy.log
    assert _warnings(capsys) == []


def test_ranged_gets_of_a_streaming_read_are_retried(
    s3_server, s3_bucket: str, monkeypatch, capsys, fast_retries
):
    """The reads inside ``open_read`` are requests no wrapper of ours sees; botocore's loop does."""
    url = storage.join(s3_bucket, "stream.bin")
    payload = os.urandom(300_000)
    storage.write_bytes(url, payload)
    with FaultProxy(s3_server.endpoint, failures=2, methods={"GET"}) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        fast_retries(3)
        capsys.readouterr()
        with storage.open_read(url) as f:
            assert f.read() == payload
    assert proxy.faults == 2
    lines = _warnings(capsys)
    assert [re.search(r"retry (\d/\d)", line).group(1) for line in lines] == ["1/2", "2/2"], lines
    assert all(line.startswith(f"warning: {url}: HTTP 503") for line in lines), lines


def test_multipart_parts_are_retried(s3_server, s3_bucket: str, monkeypatch, fast_retries):
    url = storage.join(s3_bucket, "big.bin")
    blob = os.urandom(12 << 20)  # > s3fs's 5 MiB block: parts are PUT one by one
    with FaultProxy(s3_server.endpoint, failures=2, methods={"PUT"}) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        fast_retries(3)
        with storage.open_write(url) as f:
            f.write(blob)
    assert proxy.faults == 2
    assert (s3_server.root / url[len("s3://") :]).read_bytes() == blob


def test_an_unreachable_endpoint_is_retried_then_named(s3_bucket: str, monkeypatch, capsys, fast_retries):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    fast_retries(3)
    capsys.readouterr()
    url = storage.join(s3_bucket, "x.bin")
    with pytest.raises(storage.StorageError, match=f"read {url}: .*Connect"):
        storage.read_bytes(url)
    lines = _warnings(capsys)
    assert len(lines) == 2 and all("Connect" in line for line in lines), lines


def test_a_body_cut_midway_is_not_retried_and_names_the_url(
    s3_server, s3_bucket: str, monkeypatch, fast_retries
):
    """After the headers, botocore has handed the body over: a cut there is outside the one
    retry layer (and was not retried before either). It fails at once, naming the URL."""
    url = storage.join(s3_bucket, "cut.bin")
    storage.write_bytes(url, os.urandom(200_000))
    with FaultProxy(s3_server.endpoint, failures=1, fault="cut", methods={"GET"}) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        fast_retries(5)
        with pytest.raises(storage.StorageError, match=f"read {url}: .*payload is not completed"):
            storage.read_bytes(url)
    assert [line.split()[0] for line in proxy.log].count("GET") == 1, proxy.log
