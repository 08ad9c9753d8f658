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


def test_mean_stderr_matches_numpy_and_handles_small_counts():
    from adpm_dist.diffusion.stats import mean_stderr

    v = np.random.default_rng(3).normal(2.0, 0.5, 37)
    mean, se = mean_stderr(v.sum(), (v * v).sum(), v.size)
    assert mean == pytest.approx(v.mean(), rel=1e-13)
    assert se == pytest.approx(v.std(ddof=1) / np.sqrt(v.size), rel=1e-10)
    mean, se = mean_stderr([0.0, 3.0], [0.0, 9.0], [0, 1])
    assert mean.tolist() == [0.0, 3.0] and se.tolist() == [0.0, 0.0]


def test_all_reduce_alone_keeps_the_sums():
    gf = make_file()
    before = (gf.sum.copy(), gf.sum_sq.copy(), gf.count.copy())
    assert gf.all_reduce() is gf
    for a, b in zip(before, (gf.sum, gf.sum_sq, gf.count)):
        np.testing.assert_array_equal(a, b)
    assert gf.count.dtype == np.int64


def test_load_for_reads_once_hashes_those_bytes_and_checks(tmp_path, monkeypatch):
    import hashlib
    from types import SimpleNamespace

    from adpm_dist.gamma import load_for
    from adpm_dist.io import storage

    sched = make_schedule("linear", 10)
    path = tmp_path / "g.json"
    path.write_text(make_file(schedule=sched).to_json())
    reads = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda url: reads.append(url) or real(url))
    monkeypatch.setattr(storage, "read_text", lambda *a: pytest.fail("read twice"))
    model = SimpleNamespace(schedule=sched, digest="abc", name="tiny")
    ref = load_for(model, str(path))
    assert reads == [str(path)] and ref.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ref.url == str(path) and ref.gamma.shape == (11,) and np.isnan(ref.gamma[0])
    np.testing.assert_allclose(ref.gamma[1:], ref.file.sum / ref.file.count)
    with pytest.raises(GammaFileError, match="digest"):
        load_for(SimpleNamespace(schedule=sched, digest="zzz", name="other"), str(path))
    with pytest.raises(GammaFileError, match="'cosine'"):
        load_for(SimpleNamespace(schedule=make_schedule("cosine", 10), digest="abc", name="t"), str(path))
    alone = load_for(None, str(path))  # plan: the file's own schedule, rebuilt and digest-checked
    assert alone.schedule.betas_sha256() == sched.betas_sha256()
    with pytest.raises(GammaFileError, match="no such"):
        load_for(None, str(tmp_path / "missing.json"))
