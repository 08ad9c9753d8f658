"""Pytest plugin: a real S3 server (rclone serve s3) on loopback, once per test session.

Register with ``pytest_plugins = ["tests.s3_server"]`` (or ``-p tests.s3_server``).

- ``s3_server`` (session): starts ``tools/s3_local.sh start DIR`` with generated keys and
  stops it by PID at the end of the session; exposes endpoint, keys and the served folder.
- ``s3_bucket`` (function): a fresh, empty bucket; the AWS_* variables point at the server
  for the duration of the test, and storage's cached clients are dropped before and after.
"""

from __future__ import annotations

import itertools
import os
import secrets
import subprocess
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
