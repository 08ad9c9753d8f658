"""A killed Γ job resumes with another --num-workers/--data-batch and other spellings of its paths,
from partial state written now or before this change, and says that it resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from adpm_dist.gamma import read_gamma
from adpm_dist.stages import estimate
from tests.estimate_helpers import ROOT, tiny_job_inputs

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread_module"), pytest.mark.slow]
SETTINGS = ["--no-progress", "--precision", "fp64", "--samples-per-t", "120", "--batch-size", "16",
            "--flush-every", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    inputs = tiny_job_inputs(tmp_path_factory.mktemp("gresume"))
    ref = inputs["base"] / "ref.json"
    assert estimate.main(["--checkpoint", inputs["model"], "--data", inputs["data"], "--out", str(ref),
                          "--num-workers", "0", *SETTINGS]) == 0
    return {**inputs, "ref": read_gamma(str(ref))}


def kill_after_three_rounds(cmd: list[str], partial: str) -> dict:
    """Run ``cmd`` alone, SIGKILL it once its partial state holds 3 data batches; that state."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    state_file = os.path.join(partial, "rank-00000-of-00001.json")
    deadline, state = time.time() + 120, None
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(state_file):
                state = json.loads(open(state_file).read())
                if state["units_done"] >= 3:
                    break
            time.sleep(0.02)
    finally:
        proc.kill()  # only the process started here
        err = proc.communicate()[1]
    assert state and state["units_done"] >= 3 and proc.returncode == -9, err[-2000:]
    return json.loads(open(state_file).read())  # what the rerun finds


@pytest.mark.parametrize("written", ["now", "before this change"])
def test_killed_job_resumes_with_other_workers_and_paths_and_says_so(setup, tmp_path, monkeypatch, capsys,
                                                                    written):
    out = tmp_path / "g.json"
    # The code before this change drew noise stream 1 (issue 22): its partial state resumes as such.
    stream = [] if written == "now" else ["--noise-stream", "1"]
    first = ["--checkpoint", setup["model"], "--data", setup["data"], "--out", str(out),
             "--num-workers", "0", "--data-batch", "2", *SETTINGS, *stream]
    state = kill_after_three_rounds([sys.executable, "-m", "adpm_dist.estimate", *first], f"{out}.partial")
    assert not out.exists()
    if written != "now":  # the partial state as the code before this change wrote it
        fp = state["fingerprint"]
        state["fingerprint"] = {
            "model": fp["model"], "data": json.dumps(setup["data"]), "seed": 0, "samples_per_t": 120,
            "timesteps": "all", "world_size": 1, "num_workers": 0, "data_batch": 2,
            "run_id": "0123456789abcdef", "target_stderr": None, "precision": "fp64"}
        with open(f"{out}.partial/rank-00000-of-00001.json", "w") as f:
            f.write(json.dumps(state))
    done = int(sum(state["count"]))
    assert 0 < done < 120 * 20
    monkeypatch.chdir(setup["base"])  # relative spellings of the same paths
    again = ["--checkpoint", "tiny.safetensors", "--data", "./shards/test-{000000..000002}.tar",
             "--out", os.path.relpath(out), "--num-workers", "2", "--data-batch", "3", *SETTINGS, *stream]
    assert estimate.main(again) == 0
    lines = capsys.readouterr().out.splitlines()
    resumed = [line for line in lines if line.startswith("resumed from")]
    partial = f"{os.path.relpath(out)}.partial"
    assert resumed == [f"resumed from {partial}: {done}/2400 (sample, t) evaluations done"]
    got, ref = read_gamma(str(out)), setup["ref"]
    if stream:  # the uninterrupted stream-1 run
        ref_url = str(tmp_path / "ref1.json")
        assert estimate.main(["--checkpoint", setup["model"], "--data", setup["data"], "--out", ref_url,
                              "--num-workers", "0", *SETTINGS, *stream]) == 0
        ref = read_gamma(ref_url)
    np.testing.assert_array_equal(got.count, ref.count)
    np.testing.assert_allclose(got.sum, ref.sum, rtol=1e-12)
    np.testing.assert_allclose(got.sum_sq, ref.sum_sq, rtol=1e-12)
    assert sorted(c["samples"] for c in got.contributions) == [[0, 120]]
