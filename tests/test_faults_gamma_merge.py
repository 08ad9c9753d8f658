"""Merging Γ files: draws are identified by (seed, data, sample ids, timesteps), not by run id;
--allow-incomplete is named by the errors it would accept."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.gamma import GammaFile, GammaFileError, loads, merge, read_gamma
from adpm_dist.stages import estimate
from tests.estimate_helpers import ROOT, tiny_job_inputs

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread_module")]
MERGE = [sys.executable, str(ROOT / "tools" / "merge_gamma.py")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_inputs(tmp_path_factory.mktemp("gmerge"))


def run(setup, out, *extra) -> None:
    args = ["--checkpoint", setup["model"], "--data", setup["data"], "--out", str(out), "--num-workers", "0",
            "--no-progress", "--batch-size", "64", *extra]
    assert estimate.main(args) == 0


def test_runs_with_overlapping_timesteps_are_refused_naming_both_and_the_t_range(setup, tmp_path):
    """Same seed and data, --timesteps 1-12 and 9-20: t = 9..12 would hold the same draws twice."""
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    run(setup, a, "--timesteps", "1-12")
    run(setup, b, "--timesteps", "9-20")
    run(setup, c, "--timesteps", "9-20", "--seed", "1")
    res = subprocess.run([*MERGE, str(a), str(b), "-o", str(tmp_path / "m.json"), "--allow-incomplete"],
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stdout
    (line,) = res.stderr.strip().splitlines()
    assert str(a) in line and str(b) in line and "t = 9..12" in line and "twice" in line, line
    assert not (tmp_path / "m.json").exists()
    # Another seed draws other noise: those merge, and t = 9..12 then has twice the samples.
    res = subprocess.run([*MERGE, str(a), str(c), "-o", str(tmp_path / "m.json"), "--allow-incomplete"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    m = read_gamma(str(tmp_path / "m.json"))
    assert m.count[8:12].tolist() == [120] * 4 and m.count[:8].tolist() == [60] * 8
    # The run id is a label: giving both runs the same one neither hides nor makes an overlap.
    d = tmp_path / "d.json"
    run(setup, d, "--timesteps", "13-20", "--run-id", "shared")
    e = tmp_path / "e.json"
    run(setup, e, "--timesteps", "1-12", "--run-id", "shared")
    assert len(merge([read_gamma(str(p), require_complete=False) for p in (d, e)]).contributions) == 2


def test_contributions_record_what_determines_the_draws(setup, tmp_path):
    out = tmp_path / "g.json"
    run(setup, out, "--timesteps", "2,5-7")
    (c,) = read_gamma(str(out), require_complete=False).contributions
    assert c["seed"] == 0 and c["timesteps"] == [[2, 3], [5, 8]] and c["samples"] == [0, 60]
    assert c["data"]["split"] == "test" and len(c["data"]["manifest_sha256"]) == 64


def make_file(run_id="r", samples=(0, 10), ts=(1, 11), seed=0, data="d1", legacy=False) -> GammaFile:
    gf = GammaFile.empty(make_schedule("linear", 10), {"digest": "abc", "name": "tiny"})
    t = np.arange(ts[0], ts[1])
    for _ in range(samples[1] - samples[0]):
        gf.add(t, np.full(t.size, 0.5))
    c = {"run_id": run_id, "rank": 0, "world_size": 1, "samples": list(samples)}
    if not legacy:
        c.update(seed=seed, data={"manifest_sha256": data, "split": "test"}, timesteps=[list(ts)])
    gf.contributions.append(c)
    return gf


@pytest.mark.parametrize(("other", "refused"), [
    (dict(samples=(5, 15), ts=(8, 11)), "t = 8..10"),  # ids and timesteps intersect
    (dict(samples=(5, 15), ts=(1, 2), run_id="other"), "t = 1"),  # another run id hides nothing
    (dict(samples=(10, 20)), None),  # disjoint ids
    (dict(samples=(5, 15), ts=(11, 11)), None),  # no timesteps (empty range)
    (dict(samples=(0, 10), seed=1), None),  # another seed: other noise
    (dict(samples=(0, 10), data="d2"), None),  # another data set
])
def test_hand_built_overlaps(other, refused):
    a = make_file(ts=(1, 11))
    b = make_file(**{"run_id": "r", **other})
    if refused is None:
        merge([a, b], ["a.json", "b.json"])
        return
    with pytest.raises(GammaFileError, match="a.json.*b.json") as info:
        merge([a, b], ["a.json", "b.json"])
    assert refused in str(info.value) and "twice" in str(info.value)


def test_old_contributions_load_and_merge_as_before():
    """Files written before the draw fields existed: same run id + intersecting ids = overlap."""
    old = make_file(legacy=True)
    back = loads(old.to_json(), "old.json")
    assert back.contributions == old.contributions
    merge([back, make_file(legacy=True, samples=(10, 20))])
    merge([back, make_file(legacy=True, run_id="r2", samples=(5, 12))])
    merge([back, make_file(samples=(0, 10))])  # an old and a new contribution are never compared
    with pytest.raises(GammaFileError, match="twice"):
        merge([back, make_file(legacy=True, samples=(5, 12))])
    bad = json.loads(make_file().to_json())
    bad["contributions"][0]["timesteps"] = [[3]]
    with pytest.raises(GammaFileError, match=r"contributions\[0\].*timesteps"):
        loads(json.dumps(bad), "bad.json")


def test_incomplete_inputs_and_results_name_allow_incomplete(tmp_path):
    part = make_file(ts=(1, 6))
    (tmp_path / "p.json").write_text(part.to_json())
    (tmp_path / "q.json").write_text(make_file(ts=(1, 6), seed=1).to_json())
    res = subprocess.run([*MERGE, str(tmp_path / "p.json"), "-o", str(tmp_path / "m.json")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "p.json" in res.stderr and "t = 6..10" in res.stderr and "--allow-incomplete" in res.stderr
    res = subprocess.run([*MERGE, str(tmp_path / "p.json"), str(tmp_path / "q.json"), "-o",
                          str(tmp_path / "m.json"), "--allow-incomplete"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert read_gamma(str(tmp_path / "m.json"), require_complete=False).count[:5].tolist() == [20] * 5
