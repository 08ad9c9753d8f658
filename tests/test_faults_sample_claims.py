"""One job per output prefix: ``storage.claim`` and two ``sample`` jobs racing into one prefix.

Two different jobs (seeds 0 and 1) started together into the same S3 prefix used to both
exit 0, leaving shards of both, hashes not matching the manifest, or job.json and manifest
naming different seeds. Now a job owns its prefix: never do both exit 0, and what the
survivor leaves is consistent.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from adpm_dist.io import storage
from adpm_dist.stages import sample
from tests.estimate_helpers import ROOT, save_tiny_model
from tests.s3_server import subprocess_env

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("claims") / "tiny.safetensors")
    save_tiny_model(path, num_timesteps=20)
    return path


def argv(model, out, seed, n=12):
    return ["--checkpoint", model, "--method", "ddim", "--steps", "4", "--num-samples", str(n),
            "--shard-size", "3", "--batch-size", "3", "--seed", str(seed), "--out", out, "--no-progress"]


# Model loaded, each process waits for a common start time before it looks at the output
# prefix: the two jobs reach it within a millisecond of each other (plus the trial's offset).
STARTER = ("import sys, time\n"
           "from adpm_dist.stages import sample\n"
           "real = sample.SampleJob.existing\n"
           "def timed(self):\n"
           "    sample.storage.exists(self.args.out)  # S3 client made before the wait, not after\n"
           "    time.sleep(max(0.0, float(sys.argv[1]) - time.time()))\n"
           "    return real(self)\n"
           "sample.SampleJob.existing = timed\n"
           "sys.exit(sample.main(sys.argv[2:]))\n")


def race(model, out, environ, offset_s: float):
    start = time.time() + 10.0
    cmds = [[sys.executable, "-c", STARTER, str(start + k * offset_s), *argv(model, out, k)] for k in (0, 1)]
    procs = [subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]
    return [(p.wait(timeout=240), *p.communicate()) for p in procs]


def check_consistent(out: str, seed: int, n: int = 12) -> None:
    """manifest hashes/counts = the shards; job.json = manifest job; every image's seed = SEED + i."""
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    job = json.loads(storage.read_text(storage.join(out, "job.json")))
    assert manifest["job"] == job and job["seed"] == seed
    seen = []
    for entry in manifest["shards"]:
        data = storage.read_bytes(storage.join(out, entry["name"]))
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            metas = [json.loads(tar.extractfile(m).read())
                     for m in tar.getmembers() if m.name.endswith(".json")]
        assert len(metas) == entry["count"]
        assert all(m["seed"] == seed + m["index"] for m in metas)
        seen += [m["index"] for m in metas]
    assert sorted(seen) == list(range(n))


@pytest.mark.timeout(900)
def test_two_jobs_racing_into_one_s3_prefix_never_both_run(model, s3_server, s3_bucket):
    environ = subprocess_env(s3_server, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    survivors = 0
    for trial, offset in enumerate((0.0, 0.0, 0.0, 0.02, 0.1, 0.5)):
        out = f"{s3_bucket}/race{trial}"
        (rc0, _, err0), (rc1, _, err1) = race(model, out, environ, offset)
        print(f"trial {trial} (offset {offset} s): exit statuses {rc0}, {rc1}")
        assert sorted((rc0, rc1)) in ([0, 2], [2, 2]), (trial, rc0, err0[-2000:], rc1, err1[-2000:])
        for rc, err in ((rc0, err0), (rc1, err1)):
            if rc == 2:
                lines = err.strip().splitlines()
                # Refused by the claim, or (the other job already finished) by its job.json.
                refused = "belongs to another job" in lines[0] or "different job" in lines[0]
                assert len(lines) == 1 and refused and out in lines[0], err
        if 0 in (rc0, rc1):
            survivors += 1
            winner = (rc0, rc1).index(0)
            check_consistent(out, seed=winner)
            # The winner's rerun is a no-op; the loser's command is still refused.
            assert sample.main(argv(model, out, winner)) == 0
            assert sample.main(argv(model, out, 1 - winner)) == 2
        else:  # both refused: each removed its own claim, nothing else was written
            assert storage.walk_files(out) == []
    print(f"{survivors} of 6 races had a survivor")
    assert survivors >= 1  # the staggered starts let the first job through


def test_two_jobs_racing_into_one_local_folder(model, tmp_path):
    """Locally the claim is one O_EXCL file: exactly one of two simultaneous jobs runs."""
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for trial in range(2):
        out = str(tmp_path / f"race{trial}")
        results = race(model, out, environ, 0.0)
        statuses = sorted(rc for rc, _, _ in results)
        assert statuses == [0, 2], [(rc, err[-1500:]) for rc, _, err in results]
        winner = [rc for rc, _, _ in results].index(0)
        check_consistent(out, seed=winner)


def test_same_job_resumes_and_other_job_is_refused_on_s3(model, s3_server, s3_bucket, capsys):
    out = f"{s3_bucket}/resume"
    environ = subprocess_env(s3_server, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # Kill the job after its first shards: the resumed (same) job finishes it.
    proc = subprocess.Popen([sys.executable, "-m", "adpm_dist.sample", *argv(model, out, 3, n=60)],
                            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(storage.glob(f"{out}/samples-*.tar")) >= 2:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert not storage.exists(f"{out}/manifest.json"), "the job should have been killed midway"
    assert sample.main(argv(model, out, 4, n=60)) == 2  # another job: refused while unfinished
    err = capsys.readouterr().err
    assert "belongs to another job" in err and "seed 3" in err
    assert sample.main(argv(model, out, 3, n=60)) == 0
    check_consistent(out, seed=3, n=60)
    claims = storage.listdir(f"{out}/_claims")
    assert len(claims) == 2  # one per run of the job; the refused job left none


def test_claim_primitive_local_and_s3(tmp_path, s3_bucket):
    for prefix in (str(tmp_path / "p"), f"{s3_bucket}/p"):
        first = storage.claim(prefix, "owner-a", note="job A")
        assert first is not None and storage.exists(first)
        again = storage.claim(prefix, "owner-a", note="job A")  # the same job (a resume) is accepted
        assert again is None if not storage.is_remote(prefix) else again != first
        with pytest.raises(storage.PrefixClaimed, match="belongs to another job \\(job A") as info:
            storage.claim(prefix, "owner-b", note="job B")
        assert prefix in str(info.value)
        assert sorted(storage.basename(u) for u in storage.walk_files(prefix)) == sorted(
            storage.basename(u) for u in {first, again} - {None})  # B left nothing behind
        with pytest.raises(ValueError, match="owner"):
            storage.claim(prefix, "a/b")


def test_legacy_output_without_claims_still_resumes_and_refuses(model, tmp_path, capsys):
    """A folder written before claims existed (job.json, shards, no claim): same job resumes."""
    out = tmp_path / "legacy"
    assert sample.main(argv(model, str(out), 5)) == 0
    os.unlink(out / "manifest.json")
    os.unlink(out / "_claim")
    os.unlink(out / "samples-000003.tar")
    assert sample.main(argv(model, str(out), 6)) == 2  # another job: refused, and leaves no claim
    assert "different job" in capsys.readouterr().err and not (out / "_claim").exists()
    assert sample.main(argv(model, str(out), 5)) == 0
    check_consistent(str(out), seed=5)
