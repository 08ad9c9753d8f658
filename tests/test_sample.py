"""Batched sampling to shards (issue 6): invariance, kill-and-resume, no-op rerun, refusals, S3."""

from __future__ import annotations

import glob
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from adpm_dist.diffusion.noise import CounterNoise
from adpm_dist.diffusion.samplers import make_generators
from adpm_dist.diffusion.samplers import sample as draw
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.diffusion.trajectory import make_trajectory
from adpm_dist.gamma import GammaFile, write_gamma
from adpm_dist.models.loading import load_checkpoint
from adpm_dist.stages import sample
from tests.estimate_helpers import ROOT, free_port, save_tiny_model
from tests.s3_server import subprocess_env

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sample") / "tiny.safetensors")
    save_tiny_model(path, num_timesteps=20)
    return path


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    e.update(extra)
    return e


def args(model, out, *extra, n=24, method="ddim", steps=4):
    return ["--checkpoint", model, "--method", method, "--steps", str(steps), "--num-samples", str(n),
            "--out", str(out), "--no-progress", *extra]


def torchrun(nproc, argv, environ=None, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "adpm_dist.sample", *argv]
    return subprocess.run(cmd, env=environ or env(), timeout=timeout, capture_output=True, text=True)


def shard_bytes(out) -> dict[str, bytes]:
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(f"{out}/samples-*.tar"))}


def read_samples(out) -> list[tuple[str, np.ndarray, dict]]:
    """(key, uint8 image, json) of every sample, read with tarfile/PIL only."""
    items: dict[str, dict] = {}
    for p in sorted(glob.glob(f"{out}/samples-*.tar")):
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                items.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [(k, np.asarray(Image.open(io.BytesIO(v["png"]))), json.loads(v["json"]))
            for k, v in items.items()]


@pytest.mark.slow
def test_world_size_invariance_bytes_equal_and_metadata(model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--batch-size", "4", "--shard-size", "8", "--seed", "100"]
    assert sample.main(args(model, one, *common, n=30)) == 0
    res = torchrun(2, args(model, two, *common, n=30))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = shard_bytes(one), shard_bytes(two)
    assert list(a) == [f"samples-{j:06d}.tar" for j in range(4)]  # 8+8+8+6
    assert a == b
    assert (one / "grid.png").read_bytes() == (two / "grid.png").read_bytes()
    items = read_samples(one)
    assert [k for k, _, _ in items] == [f"samples_{i:08d}" for i in range(30)]
    loaded = load_checkpoint(model)
    for k, img, meta in items:
        i = int(k.split("_")[1])
        assert meta["index"] == i and meta["seed"] == 100 + i
        assert meta["method"] == "ddim" and meta["steps"] == 4 and meta["trajectory"] == "even"
        assert meta["model_digest"] == loaded.digest and meta["gamma_sha256"] is None
        assert img.shape == (8, 8) and img.dtype == np.uint8
    assert len({img.tobytes() for _, img, _ in items}) == 30  # distinct seeds, distinct images
    manifest = json.loads((one / "manifest.json").read_text())
    assert sum(s["count"] for s in manifest["shards"]) == 30
    assert manifest["job"]["tau"] == [1, 7, 14, 20]
    grid = np.asarray(Image.open(one / "grid.png"))
    # 30 images, 8 columns, each 8 px enlarged ×8 to 64 px, 2 px padding
    assert grid.shape == (4 * 66 + 2, 8 * 66 + 2)
    np.testing.assert_array_equal(grid[2:66, 2:66], items[0][1].repeat(8, 0).repeat(8, 1))


@pytest.mark.parametrize("stream", [2, 1])
def test_batch_size_invariance_fp64_and_equal_to_direct_sampler(model, tmp_path, stream):
    """fp64: any batch size gives the same bytes, equal to samplers.sample on each seed alone —
    with noise stream 2 (the default: CounterNoise, one draw per batch) and with stream 1 (a
    generator per image, the images made before stream 2)."""
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ("--shard-size", "7", "--precision", "fp64", "--noise-stream", str(stream))
    assert sample.main(args(model, a, "--batch-size", "5", *flags, n=14, method="ddpm-beta", steps=6)) == 0
    assert sample.main(args(model, b, "--batch-size", "3", *flags, n=14, method="ddpm-beta", steps=6)) == 0
    assert shard_bytes(a) == shard_bytes(b)
    loaded = load_checkpoint(model)
    net = loaded.model.double()
    tau = make_trajectory("even", loaded.schedule, 6)
    got = {int(k.split("_")[1]): img for k, img, _ in read_samples(a)}
    for i in (0, 9, 13):
        noise = CounterNoise([i]) if stream == 2 else make_generators([i])
        with torch.no_grad():
            x = draw(lambda x, n: net(x, n), loaded.schedule, tau, "ddpm-beta", noise, (1, 8, 8),
                     dtype=torch.float64)
        want = np.round((x[0, 0].numpy().clip(-1, 1) + 1) * 127.5).astype(np.uint8)
        np.testing.assert_array_equal(got[i], want)


def test_kill_and_resume_equals_uninterrupted_run(model, tmp_path):
    common = ["--batch-size", "2", "--shard-size", "2", "--seed", "7"]
    n = 40
    whole = tmp_path / "whole"
    assert sample.main(args(model, whole, *common, n=n, steps=10)) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "adpm_dist.sample", *args(model, out, *common, n=n, steps=10)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(glob.glob(f"{out}/samples-*.tar")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = shard_bytes(out)
    assert 3 <= len(partial) < n // 2, "the job should have been killed midway"
    assert not (out / "manifest.json").exists()
    # What is visible is complete: every visible shard equals the uninterrupted run's.
    full = shard_bytes(whole)
    assert all(full[name] == data for name, data in partial.items())

    assert sample.main(args(model, out, *common, n=n, steps=10)) == 0
    assert shard_bytes(out) == full
    assert not glob.glob(f"{out}/.*.tmp")  # a killed writer's temporary file is cleaned up
    keys = [k for k, _, _ in read_samples(out)]
    assert len(keys) == len(set(keys)) == n
    assert (out / "manifest.json").read_bytes() == (whole / "manifest.json").read_bytes()


@pytest.mark.slow
def test_rerun_of_finished_job_is_noop_and_other_jobs_refused(model, tmp_path, capsys):
    out = tmp_path / "o"
    assert sample.main(args(model, out, "--shard-size", "5", n=10)) == 0
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{out}/*")}
    capsys.readouterr()
    assert sample.main(args(model, out, "--shard-size", "5", "--batch-size", "3", n=10)) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{out}/*")} == stamps
    assert sample.main(args(model, out, "--shard-size", "5", "--seed", "1", n=10)) == 2
    err = capsys.readouterr().err
    assert "different job" in err and "seed" in err
    # Under torchrun too: every rank stops with the message (none is left waiting for the others).
    res = torchrun(2, args(model, out, "--shard-size", "5", "--seed", "1", n=10), timeout=120)
    assert res.returncode != 0 and "different job" in res.stderr


def _gamma_file(path, schedule, model_desc, value=0.6):
    gf = GammaFile.empty(schedule, model_desc)
    n = schedule.num_timesteps
    gf.add(np.repeat(np.arange(1, n + 1), 2), np.full(2 * n, value))
    write_gamma(gf, str(path))


def test_refusals_k_range_and_foreign_gamma_files(model, tmp_path, capsys):
    loaded = load_checkpoint(model)
    assert sample.main(args(model, tmp_path / "k1", steps=1)) == 2
    assert "argument --steps: 1: must be >= 2" in capsys.readouterr().err  # refused when parsed
    assert sample.main(args(model, tmp_path / "k21", steps=21)) == 2
    assert "--steps 21: need 2 <= K <= N = 20" in capsys.readouterr().err  # N is the checkpoint's
    assert sample.main(args(model, tmp_path / "a", method="analytic-ddpm")) == 2
    assert "needs --gamma" in capsys.readouterr().err

    other_sched = tmp_path / "other-schedule.json"
    _gamma_file(other_sched, make_schedule("cosine", 20), loaded.describe())
    assert sample.main(args(model, tmp_path / "b", "--gamma", str(other_sched), method="analytic-ddim")) == 2
    err = capsys.readouterr().err
    assert str(other_sched) in err and "'cosine'" in err and "'linear'" in err

    other_model = tmp_path / "other-model.json"
    _gamma_file(other_model, loaded.schedule, {"digest": "f" * 64, "name": "someone-else"})
    assert sample.main(args(model, tmp_path / "c", "--gamma", str(other_model), method="analytic-ddim")) == 2
    err = capsys.readouterr().err
    assert "someone-else" in err and loaded.digest[:12] in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # refused before writing


@pytest.mark.parametrize("method", ["ddpm-beta", "ddpm-tilde", "analytic-ddpm", "analytic-ddim"])
def test_every_method_samples_and_records_gamma_digest(model, tmp_path, method):
    loaded = load_checkpoint(model)
    extra = []
    if method.startswith("analytic"):
        g = tmp_path / "g.json"
        _gamma_file(g, loaded.schedule, loaded.describe())
        extra = ["--gamma", str(g), "--clip-pixel", "2", "--trajectory", "optimal"]
    out = tmp_path / "o"
    assert sample.main(args(model, out, *extra, n=4, method=method, steps=5)) == 0
    items = read_samples(out)
    assert len(items) == 4 and all(m["method"] == method for _, _, m in items)
    if extra:
        import hashlib

        assert items[0][2]["gamma_sha256"] == hashlib.sha256((tmp_path / "g.json").read_bytes()).hexdigest()
        assert items[0][2]["trajectory"] == "optimal"


@pytest.mark.timeout(300)
def test_two_ranks_write_to_s3(model, s3_server, s3_bucket, tmp_path):
    from adpm_dist.io import storage

    out = f"{s3_bucket}/samples/run1"
    res = torchrun(2, args(model, out, "--shard-size", "5", "--batch-size", "5", n=12),
                   environ=env(**subprocess_env(s3_server)))
    assert res.returncode == 0, res.stderr[-3000:]
    local = tmp_path / "local"
    assert sample.main(args(model, local, "--shard-size", "5", "--batch-size", "5", n=12)) == 0
    for name, data in shard_bytes(local).items():
        assert storage.read_bytes(f"{out}/{name}") == data
    assert storage.exists(f"{out}/grid.png") and storage.exists(f"{out}/manifest.json")
