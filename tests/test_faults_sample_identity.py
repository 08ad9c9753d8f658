"""Reruns compare what determines the result: a relative and an absolute spelling of the same
checkpoint, Γ file, data or output are one job, and --num-workers (or --flush-every) is not
part of it. Interrupted or finished, such a rerun is accepted: it resumes or says "already
complete". Outputs written before this rule (legacy fingerprints) stay usable."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from adpm_dist.gamma import GammaFile, write_gamma
from adpm_dist.models.loading import load_checkpoint
from adpm_dist.stages import evaluate, sample
from tests.estimate_helpers import ROOT, make_digit_shards, save_tiny_model

pytestmark = [pytest.mark.timeout(400), pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a model, its Γ file and test shards, addressed relative to it."""
    base = tmp_path_factory.mktemp("identity")
    save_tiny_model(str(base / "tiny.safetensors"), num_timesteps=20)
    loaded = load_checkpoint(str(base / "tiny.safetensors"))
    gf = GammaFile.empty(loaded.schedule, loaded.describe())
    n = loaded.schedule.num_timesteps
    gf.add(list(range(1, n + 1)) * 2, [0.5] * n + [0.6] * n)
    write_gamma(gf, str(base / "g.json"))
    make_digit_shards(str(base / "shards"), limit=200, shard_size=20)  # 40 test images
    return base


def sample_argv(root: str, out: str, n=40):
    return ["--checkpoint", os.path.join(root, "tiny.safetensors"), "--gamma", os.path.join(root, "g.json"),
            "--method", "analytic-ddim", "--steps", "10", "--num-samples", str(n), "--shard-size", "2",
            "--batch-size", "2", "--seed", "9", "--out", out, "--no-progress"]


def shards(out) -> dict[str, bytes]:
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(f"{out}/samples-*.tar"))}


def test_sample_resumed_with_absolute_paths_after_a_relative_start(work, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    assert sample.main(sample_argv(str(work), str(ref))) == 0
    # Started with paths relative to the work folder, killed after a few shards …
    out = f"out-{tmp_path.name}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "adpm_dist.sample", *sample_argv(".", out)],
                            cwd=str(work), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(shards(work / out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= len(shards(work / out)) < 20 and not (work / out / "manifest.json").exists()
    # … resumed with absolute paths: the same job, finished, byte-identical to the reference.
    assert sample.main(sample_argv(str(work), str(work / out))) == 0, capsys.readouterr().err
    assert shards(work / out) == shards(ref)
    manifest = json.loads((work / out / "manifest.json").read_text())
    assert manifest["job"] == json.loads((work / out / "job.json").read_text())
    # Finished: relative spelling again (from the work folder) is a no-op.
    monkeypatch.chdir(work)
    capsys.readouterr()
    assert sample.main(sample_argv(".", out)) == 0
    assert "already complete" in capsys.readouterr().out


# ----------------------------------------------------------------------------- evaluate nll


def nll_argv(root: str, out: str, workers: int, *extra):
    return ["nll", "--checkpoint", os.path.join(root, "tiny.safetensors"),
            "--data", os.path.join(root, "shards", "test-*.tar"), "--steps", "3",
            "--methods", "ddpm-beta,ddpm-tilde", "--out", out, "--batch-size", "8", "--flush-every", "1",
            "--per-image", "--precision", "fp64", "--num-workers", str(workers), "--no-progress", *extra]


@pytest.fixture(scope="module")
def nll_ref(work):
    out = work / "nll-ref"
    assert evaluate.main(nll_argv(str(work), str(out), 0)) == 0
    return json.loads((out / "nll.json").read_text())


def same_numbers(doc, ref):
    assert doc["num_images"] == ref["num_images"] == 40
    assert doc["per_image_bpd"].keys() == ref["per_image_bpd"].keys()
    for i, row in ref["per_image_bpd"].items():
        for key, v in row.items():
            assert doc["per_image_bpd"][i][key] == pytest.approx(v, rel=1e-12)
    for key, r in ref["results"].items():
        assert doc["results"][key]["bpd"] == pytest.approx(r["bpd"], rel=1e-12)


def test_nll_finished_rerun_with_absolute_paths_and_other_workers_is_a_no_op(work, nll_ref, monkeypatch,
                                                                            capsys):
    monkeypatch.chdir(work)
    assert evaluate.main(nll_argv(".", "nll-done", 0)) == 0
    stamp = os.stat(work / "nll-done" / "nll.json").st_mtime_ns
    capsys.readouterr()
    assert evaluate.main(nll_argv(str(work), str(work / "nll-done"), 2)) == 0
    assert "already complete" in capsys.readouterr().out
    assert os.stat(work / "nll-done" / "nll.json").st_mtime_ns == stamp


def test_nll_resumes_with_absolute_paths_and_other_workers(work, nll_ref, monkeypatch):
    """Two batches flushed with 0 workers and relative paths; resumed with 2 workers (which
    batch the rank's images differently) and absolute paths: every image exactly once."""
    monkeypatch.chdir(work)
    real, calls = evaluate.negative_elbos, {"n": 0}

    def crashing(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **kw)

    monkeypatch.setattr(evaluate, "negative_elbos", crashing)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(nll_argv(".", "nll-partial", 0))
    partial = json.loads((work / "nll-partial" / "nll.partial" / "rank-00000-of-00001.json").read_text())
    assert partial["count"] == 16
    monkeypatch.setattr(evaluate, "negative_elbos", real)
    assert evaluate.main(nll_argv(str(work), str(work / "nll-partial"), 2)) == 0
    same_numbers(json.loads((work / "nll-partial" / "nll.json").read_text()), nll_ref)


def test_nll_outputs_written_before_canonical_fingerprints_stay_usable(work, nll_ref, capsys):
    """Finished: a legacy fingerprint (data spelled as typed, num_workers in it) is recognised.
    Partial: legacy state (batch counts) is discarded with a warning and the job starts over."""
    out = work / "legacy"
    assert evaluate.main(nll_argv(str(work), str(out), 0)) == 0
    doc = json.loads((out / "nll.json").read_text())
    doc["fingerprint"].update(data=json.dumps(os.path.join(str(work), "shards", "test-*.tar")), num_workers=0)
    (out / "nll.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert evaluate.main(nll_argv(str(work), str(out), 1)) == 0
    assert "already complete" in capsys.readouterr().out

    out = work / "legacy-partial"
    (out / "nll.partial").mkdir(parents=True)
    state = {"fingerprint": {**doc["fingerprint"], "world_size": 1}, "units_done": 2, "count": 16,
             "sums": {}, "per_image": {}}
    (out / "nll.partial" / "rank-00000-of-00001.json").write_text(json.dumps(state))
    assert evaluate.main(nll_argv(str(work), str(out), 0)) == 0
    err = capsys.readouterr().err
    assert "partial state of an earlier version" in err and "starts over" in err
    same_numbers(json.loads((out / "nll.json").read_text()), nll_ref)
    assert np.isfinite(nll_ref["results"]["even/K=3/ddpm-beta"]["bpd"])
