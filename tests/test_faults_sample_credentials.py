"""Refused or missing S3 credentials: ``sample`` and ``evaluate`` end with ONE ``error:`` line
naming the URL, never the secret, exit 2 — no traceback (a missing secret used to end in a
StorageError traceback, exit 1). Real rclone S3 server, real CLI processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adpm_dist.io import storage
from tests.estimate_helpers import ROOT, make_digit_shards, save_tiny_model
from tests.s3_server import subprocess_env

pytestmark = pytest.mark.timeout(600)

WRONG = "WRONGsecretWRONG0123456789"

# (variable changes, words the message must contain)
CREDENTIALS = {
    "wrong secret": ({"AWS_SECRET_ACCESS_KEY": WRONG}, "access denied"),
    "wrong key id": ({"AWS_ACCESS_KEY_ID": "AKWRONGKEY000"}, "access denied"),
    "no secret": ({"AWS_SECRET_ACCESS_KEY": ""}, "no usable S3 credentials"),
    "no key id": ({"AWS_ACCESS_KEY_ID": ""}, "no usable S3 credentials"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("creds")
    model = str(base / "tiny.safetensors")
    save_tiny_model(model)
    data = make_digit_shards(str(base / "shards"), limit=100, shard_size=20)
    return {"model": model, "data": data}


def run(server, module_argv, changes):
    env = subprocess_env(server, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HOME="/nonexistent")
    env.update(changes)
    return subprocess.run([sys.executable, "-m", *module_argv], env=env, capture_output=True, text=True,
                          timeout=180, cwd=str(ROOT))


def check(res, url, server, words):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert url in lines[0] and words in lines[0]
    for secret in (WRONG, server.secret, server.key):
        assert secret not in res.stderr + res.stdout


@pytest.mark.parametrize("case", list(CREDENTIALS))
def test_sample_with_refused_credentials(files, s3_server, s3_bucket, case):
    changes, words = CREDENTIALS[case]
    out = f"{s3_bucket}/samples"
    argv = ["adpm_dist.sample", "--checkpoint", files["model"], "--method", "ddim", "--steps", "3",
            "--num-samples", "2", "--out", out, "--no-progress"]
    res = run(s3_server, argv, changes)
    check(res, out, s3_server, words)
    assert storage.walk_files(s3_bucket) == []  # nothing was written


@pytest.mark.parametrize("case", ["wrong secret", "no secret"])
def test_evaluate_with_refused_credentials(files, s3_server, s3_bucket, case):
    changes, words = CREDENTIALS[case]
    storage.upload_dir(files["data"].split("/test-")[0], f"{s3_bucket}/shards")
    data = f"{s3_bucket}/shards/test-*.tar"
    nll = ["adpm_dist.evaluate", "nll", "--checkpoint", files["model"], "--data", data, "--steps", "3",
           "--methods", "ddpm-beta", "--out", f"{s3_bucket}/nll", "--num-workers", "0", "--no-progress"]
    check(run(s3_server, nll, changes), data, s3_server, words)
    fid = ["adpm_dist.evaluate", "fid", "--samples", data, "--reference", data, "--num-workers", "0",
           "--no-progress"]
    check(run(s3_server, fid, changes), data, s3_server, words)
