"""Pytest plugin: a real S3 server (rclone serve s3) on loopback, once per test session.

Register with ``pytest_plugins = ["tests.s3_server"]`` (or ``-p tests.s3_server``).

- ``s3_server`` (session): starts ``tools/s3_local.sh start DIR`` with generated keys and
  stops it by PID at the end of the session; exposes endpoint, keys and the served folder.
- ``s3_bucket`` (function): a fresh, empty bucket; the AWS_* variables point at the server
  for the duration of the test, and storage's cached clients are dropped before and after.
- :class:`FaultProxy`: an HTTP proxy in front of the server that injects the faults a healthy
  server never produces (503 SlowDown, an error whose text looks transient, a body cut short)
  and counts the requests that reach it.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import os
import secrets
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "s3_local.sh"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key: str
    secret: str
    root: Path  # the served folder: each sub-folder is a bucket

    def env(self) -> dict[str, str]:
        """The variables a client process needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


def _parse_exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            name, value = line[len("export ") :].split("=", 1)
            out[name] = value
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """One rclone S3 server for the whole session; stopped (by PID) at the end."""
    root = tmp_path_factory.mktemp("s3") / "data"
    root.mkdir()
    proc = subprocess.run(
        ["bash", str(SCRIPT), "start", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"s3_local.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    env = _parse_exports(proc.stdout)
    server = S3Server(
        endpoint=env["AWS_ENDPOINT_URL"],
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        root=root,
    )
    try:
        yield server
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(root)], timeout=30, check=False)


_bucket_counter = itertools.count()


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh empty bucket 's3://…' with the AWS_* environment pointing at the server."""
    from adpm_dist.io import storage

    name = f"t{next(_bucket_counter):04d}-{secrets.token_hex(4)}"
    for var, value in s3_server.env().items():
        monkeypatch.setenv(var, value)
    storage.configure(endpoint_url=None, key=None, secret=None)  # env only; drops clients
    # Created through the S3 API (CreateBucket), as a user would; rclone makes a folder.
    storage.filesystem(f"s3://{name}").mkdir(name)
    yield f"s3://{name}"
    storage.configure(endpoint_url=None, key=None, secret=None)


def subprocess_env(server: S3Server, **extra: str) -> dict[str, str]:
    """os.environ plus the server's variables, for child processes."""
    env = dict(os.environ)
    env.update(server.env())
    env.update(extra)
    return env


class FaultProxy:
    """An HTTP proxy in front of the real server: the first ``failures`` requests (of the
    ``methods`` given; all by default) get ``fault``, the rest are forwarded unchanged.

    Faults: ``"slowdown"`` (503 SlowDown), ``"bad-request"`` (400 whose message reads like a
    transient error: only typed retry conditions tell it apart), ``"cut"`` (the real response
    with its body cut in half, then the connection closed). ``requests`` counts every request
    that reached the proxy (``log`` lists them), ``faults`` the ones that got the fault.
    """

    BODIES = {
        "slowdown": (503, b"<Error><Code>SlowDown</Code><Message>Please reduce</Message></Error>"),
        "bad-request": (400, b"<Error><Code>InvalidRequest</Code>"
                             b"<Message>connection reset, timed out; slow down</Message></Error>"),
    }

    def __init__(self, upstream: str, failures: int, fault: str = "slowdown", methods=None):
        self.upstream = upstream.replace("http://", "")
        self.failures, self.fault, self.methods = failures, fault, methods
        self.requests = self.faults = 0
        self.log: list[str] = []  # "METHOD /path?query" of every request
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue" (botocore's PUTs wait for it)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hit = proxy._take_fault(self.command, self.path)
                if hit and proxy.fault in proxy.BODIES:
                    status, msg = proxy.BODIES[proxy.fault]
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD response has no body
                        self.wfile.write(msg)
                    return
                proxy._forward(self, body, cut=hit)  # a hit here is a "cut"

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _take_fault(self, method: str, path: str) -> bool:
        with self.lock:
            self.requests += 1
            self.log.append(f"{method} {path}")
            hit = (self.methods is None or method in self.methods) and self.faults < self.failures
            self.faults += hit
            return hit

    def _forward(self, handler, body: bytes, cut: bool) -> None:
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        headers = {k: v for k, v in handler.headers.items() if k.lower() != "expect"}  # answered here
        conn.request(handler.command, handler.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        handler.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                handler.send_header(k, v)
        if handler.command == "HEAD":
            handler.send_header("Content-Length", resp.getheader("Content-Length", "0"))
            handler.end_headers()
            return
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[: len(data) // 2] if cut else data)
        if cut:
            handler.wfile.flush()
            handler.close_connection = True

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
