"""The Γ file format: round trip, validation errors that name the problem, exact merge."""

import json

import numpy as np
import pytest

from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.gamma import FORMAT, GammaFile, GammaFileError, check_model, check_schedule, loads, merge


def make_file(run_id="r1", start=0, end=10, seed=0, schedule=None, digest="abc"):
    sched = schedule or make_schedule("linear", 10)
    gf = GammaFile.empty(sched, {"digest": digest, "name": "tiny"}, {"urls": "x"})
    rng = np.random.default_rng(seed)
    for _ in range(end - start):
        t = np.arange(1, 11)
        gf.add(t, rng.uniform(0, 1, 10))
    gf.contributions.append({"run_id": run_id, "rank": 0, "world_size": 1, "samples": [start, end]})
    return gf


def test_round_trip_and_derived_fields():
    gf = make_file()
    obj = json.loads(gf.to_json())
    assert obj["format"] == FORMAT and len(obj["gamma"]) == 10 and obj["count"] == [10] * 10
    assert set(obj["schedule"]) == {"name", "num_timesteps", "betas_sha256"}
    back = loads(gf.to_json(), "g.json")
    np.testing.assert_array_equal(back.sum, gf.sum)
    np.testing.assert_array_equal(back.count, gf.count)
    np.testing.assert_allclose(obj["gamma"], gf.sum / gf.count)
    # stderr is the sample standard deviation over √count
    vals = np.random.default_rng(0).uniform(0, 1, (10, 10))
    np.testing.assert_allclose(back.stderr, vals.std(axis=0, ddof=1) / np.sqrt(10))
    assert back.gamma_vector().shape == (11,)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda o: o.update(format="other/1"), "format"),
        (lambda o: o.pop("sum"), "missing field 'sum'"),
        (lambda o: o.update(sum=o["sum"][:-1]), "length N=10"),
        (lambda o: o.update(count=[0] + o["count"][1:]), "count is 0 at n = \\[1\\]"),
        (lambda o: o["schedule"].pop("betas_sha256"), "betas_sha256"),
        (lambda o: o.update(contributions=[{"run_id": 3}]), "contributions\\[0\\]"),
    ],
)
def test_validation_names_file_and_field(mutate, message):
    obj = json.loads(make_file().to_json())
    mutate(obj)
    with pytest.raises(GammaFileError, match="my.json: .*" + message):
        loads(json.dumps(obj), "my.json")


def test_non_finite_and_garbage_are_refused():
    text = make_file().to_json().replace('"sum": [', '"sum": [NaN, ', 1)
    with pytest.raises(GammaFileError, match="bad.json"):
        loads(text, "bad.json")
    with pytest.raises(GammaFileError, match="not valid JSON"):
        loads("{", "x.json")


def test_schedule_and_model_mismatch_messages_name_both():
    gf = make_file()
    with pytest.raises(GammaFileError, match="'linear'.*'cosine'"):
        check_schedule(gf, make_schedule("cosine", 10), "g.json")
    check_schedule(gf, make_schedule("linear", 10))
    with pytest.raises(GammaFileError, match="'tiny'.*'other'"):
        check_model(gf, "zzz", "other", "g.json")


def test_merge_is_exact_and_refuses_overlap_and_mismatch():
    a, b = make_file("r1", 0, 10, seed=1), make_file("r1", 10, 25, seed=2)
    m = merge([a, b])
    np.testing.assert_array_equal(m.count, a.count + b.count)
    np.testing.assert_allclose(m.sum, a.sum + b.sum, rtol=0)
    with pytest.raises(GammaFileError, match="twice"):
        merge([a, make_file("r1", 5, 12)])
    merge([a, make_file("r2", 5, 12)])  # another run's ids do not collide
    with pytest.raises(GammaFileError, match="schedule"):
        merge([a, make_file("r3", schedule=make_schedule("cosine", 10))])
    with pytest.raises(GammaFileError, match="model"):
        merge([a, make_file("r4", digest="def")])
