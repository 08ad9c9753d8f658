"""The Γ file format: round trip, validation errors that name the problem, exact merge; format 2's
model-error moments (round trip, validation, merge with format 1, the API the maths uses)."""

import json

import numpy as np
import pytest

from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.gamma import (
    FORMAT,
    FORMAT_1,
    GammaFile,
    GammaFileError,
    check_model,
    check_schedule,
    loads,
    merge,
    require_moments,
    summary,
)
from adpm_dist.gamma.moments import PER_T, SCALARS


def fake_errors(rng, t):
    """Per-pair statistics of the right signs (b signed), decoder terms NaN off t = 1."""
    out = {k: rng.uniform(0, 2, t.size) for k in ("a", "a_raw", "c", "x0_sq")}
    out.update(b=rng.normal(0, 1, t.size), b_raw=rng.normal(0, 1, t.size))
    for key in ("decoder_nll", "decoder_nll_raw"):
        out[key] = np.where(t == 1, rng.uniform(0, 3, t.size), np.nan)
    return out


def make_file(run_id="r1", start=0, end=10, seed=0, schedule=None, digest="abc", moments=False, ts=None):
    sched = schedule or make_schedule("linear", 10)
    gf = GammaFile.empty(sched, {"digest": digest, "name": "tiny"}, {"urls": "x"}, moments=moments)
    rng = np.random.default_rng(seed)
    for _ in range(end - start):
        t = np.arange(1, 11) if ts is None else np.asarray(ts)
        gf.add(t, rng.uniform(0, 1, t.size), fake_errors(rng, t) if moments else None)
    gf.contributions.append({"run_id": run_id, "rank": 0, "world_size": 1, "samples": [start, end]})
    return gf


def test_round_trip_and_derived_fields():
    gf = make_file()
    obj = json.loads(gf.to_json())
    assert obj["format"] == FORMAT_1 and "moments" not in obj  # no moments kept: format 1, as before
    assert len(obj["gamma"]) == 10 and obj["count"] == [10] * 10
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
    with pytest.raises(GammaFileError) as err:  # same name, other weights: say that, not the name twice
        check_model(gf, "zzz", "tiny", "g.json")
    msg = str(err.value)
    assert "same architecture and name, different weights (another run or checkpoint" in msg
    assert msg.count("'tiny'") == 1 and "abc" in msg and "zzz" in msg
    with pytest.raises(GammaFileError) as err:
        merge([gf, make_file("r9", 20, 30, digest="zzz")], ["a.json", "b.json"])
    assert "same architecture and name, different weights" in str(err.value)
    assert "a.json" in str(err.value) and "b.json" in str(err.value)


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


# ---------------------------------------------------------------- format 2: the model-error moments


def test_moments_round_trip_exactly_and_give_the_means_the_maths_uses():
    gf = make_file(moments=True, ts=[1, 2, 2, 5], end=7)
    obj = json.loads(gf.to_json())
    assert obj["format"] == FORMAT == "adpm-gamma/2"
    assert set(obj["moments"]) == set(PER_T) | set(SCALARS)
    back = loads(gf.to_json(), "g.json", require_complete=False)
    assert back.has_moments() and back.source == "g.json"
    np.testing.assert_array_equal(back.moments.per_t, gf.moments.per_t)
    np.testing.assert_array_equal(back.moments.scalars, gf.moments.scalars)
    assert obj["moments"]["x0_sq"]["count"] == 28 and obj["moments"]["decoder_nll"]["count"] == 7
    # The means, recomputed from the pairs (same generator), with the file's layout: length N+1.
    rng, pairs = np.random.default_rng(0), []
    for _ in range(7):
        t = np.array([1, 2, 2, 5])
        rng.uniform(0, 1, 4)
        pairs.append((t, fake_errors(rng, t)))
    for clip, sfx in ((True, ""), (False, "_raw")):
        m = back.error_moments(clip_x0=clip)
        for name, key in (("a", "a" + sfx), ("b", "b" + sfx), ("c", "c")):
            got = getattr(m, name)
            assert got.shape == (11,) and np.isnan(got[0]) and np.all(np.isnan(got[[3, 4, 6, 7, 8, 9, 10]]))
            for t in (1, 2, 5):
                vals = np.concatenate([e[key][ts == t] for ts, e in pairs])
                assert got[t] == pytest.approx(vals.mean(), rel=1e-12)
                if name == "a":
                    assert m.a_stderr[t] == pytest.approx(vals.std(ddof=1) / np.sqrt(vals.size), rel=1e-9)
        x0 = np.concatenate([e["x0_sq"] for _, e in pairs])
        dec = np.concatenate([e["decoder_nll" + sfx][ts == 1] for ts, e in pairs])
        assert m.x0_sq == pytest.approx(x0.mean(), rel=1e-12)
        assert m.x0_sq_stderr == pytest.approx(x0.std(ddof=1) / np.sqrt(x0.size), rel=1e-9)
        assert m.decoder_nll == pytest.approx(dec.mean(), rel=1e-12)
        assert m.decoder_nll_stderr == pytest.approx(dec.std(ddof=1) / np.sqrt(dec.size), rel=1e-9)
    m.require([2, 5], fields="abc")  # the maths' own check sees the evaluated timesteps …
    with pytest.raises(ValueError, match=r"t = \[3\]"):  # … and the missing ones as missing
        m.require([2, 3], fields="abc")


def test_decoder_term_is_nan_when_t_1_was_not_evaluated():
    m = make_file(moments=True, ts=[2, 3]).error_moments()
    assert np.isnan(m.decoder_nll) and np.isnan(m.decoder_nll_stderr) and np.isfinite(m.x0_sq)


def test_a_format_1_file_loads_without_moments_and_require_moments_names_it(tmp_path):
    from adpm_dist.gamma import load_for

    old = make_file()
    path = tmp_path / "old.json"
    path.write_text(old.to_json())
    back = loads(old.to_json(), "old.json")
    assert not back.has_moments() and back.error_moments() is None and back.error_moments(False) is None
    ref = load_for(None, str(path))
    assert ref.moments() is None and ref.moments(clip_x0=False) is None
    for what, name in ((ref, str(path)), (back, "old.json")):
        with pytest.raises(GammaFileError) as err:
            require_moments(what, "--variance residual-ddpm")
        want = (f"{name} is a format-1 Γ file without the model-error moments that --variance "
                "residual-ddpm needs; re-run the Γ job (adpm_dist.estimate) with this version")
        assert want in str(err.value)
    new = tmp_path / "new.json"
    new.write_text(make_file(moments=True).to_json())
    ref = load_for(None, str(new))
    got = require_moments(ref, "x")
    np.testing.assert_array_equal(got.a, ref.moments().a)
    np.testing.assert_array_equal(require_moments(ref, "x", clip_x0=False).a, ref.moments(clip_x0=False).a)
    assert not np.array_equal(got.a[1:], ref.moments(clip_x0=False).a[1:])


def _set(path: str, value):
    def mutate(obj):
        *keys, last = path.split(".")
        for k in keys:
            obj = obj[k]
        if value is KeyError:
            obj.pop(last)
        else:
            obj[last] = value(obj[last]) if callable(value) else value
    return mutate


@pytest.mark.parametrize(("mutate", "message"), [
    (_set("moments", KeyError), "missing field 'moments' \\(format 'adpm-gamma/2'\\)"),
    (_set("moments", [1, 2]), "field 'moments' must be an object"),
    (_set("moments.c", KeyError), "field 'moments.c' is missing"),
    (_set("moments.a.sum", lambda v: v[:-1]), "field 'moments.a.sum' must be a list of length N=10, got 9"),
    (_set("moments.b_raw.sum_sq", lambda v: ["x"] * 10), "field 'moments.b_raw.sum_sq' holds non-numbers"),
    (_set("moments.a_raw.sum", lambda v: [-1.0] + v[1:]), "field 'moments.a_raw' has negative sums"),
    (_set("moments.x0_sq.count", 99), "field 'moments.x0_sq.count' is 99, but the file's 'count' gives 100"),
    (_set("moments.decoder_nll.sum", "1"), "field 'moments.decoder_nll.sum' must be a finite number"),
    (_set("moments.decoder_nll_raw.count", 3), "'moments.decoder_nll_raw.count' is 3.*gives 10"),
    (_set("format", "adpm-gamma/9"), "format is 'adpm-gamma/9', expected one of"),
])
def test_moment_fields_are_validated_naming_file_and_field(mutate, message):
    obj = json.loads(make_file(moments=True).to_json())
    mutate(obj)
    with pytest.raises(GammaFileError, match="my.json: .*" + message):
        loads(json.dumps(obj), "my.json")
    negative_b = json.loads(make_file(moments=True).to_json())
    negative_b["moments"]["b"]["sum"] = [-1.0] * 10  # B is signed: accepted
    loads(json.dumps(negative_b), "ok.json")


def test_merge_adds_the_moments_and_a_format_1_input_drops_them():
    a, b = make_file("r1", 0, 10, seed=1, moments=True), make_file("r1", 10, 25, seed=2, moments=True)
    m = merge([a, b])
    np.testing.assert_allclose(m.moments.per_t, a.moments.per_t + b.moments.per_t, rtol=1e-15)
    np.testing.assert_array_equal(m.moments.scalars[:, 2], a.moments.scalars[:, 2] + b.moments.scalars[:, 2])
    assert summary(m)["moments"] is True
    back = loads(m.to_json(), "m.json")  # the counts of the merged file are consistent
    np.testing.assert_array_equal(back.moments.per_t, m.moments.per_t)
    mixed = merge([a, make_file("r1", 10, 25, seed=2)])
    assert not mixed.has_moments() and summary(mixed)["moments"] is False
    assert json.loads(mixed.to_json())["format"] == FORMAT_1
    np.testing.assert_array_equal(mixed.count, a.count + 15)


def test_all_reduce_packs_the_moments_into_the_one_collective(monkeypatch):
    """Alone the reduction is the identity; the moments travel in the same (single) call."""
    from adpm_dist.io import dist

    calls = []
    real = dist.all_reduce_sum
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: calls.append(t.numel()) or real(t))
    gf = make_file(moments=True)
    before = (gf.moments.per_t.copy(), gf.moments.scalars.copy(), gf.moments)
    assert gf.all_reduce() is gf
    assert calls == [3 * 10 + len(PER_T) * 2 * 10 + len(SCALARS) * 3]
    np.testing.assert_array_equal(gf.moments.per_t, before[0])
    np.testing.assert_array_equal(gf.moments.scalars, before[1])
    assert gf.moments is not before[2]  # new arrays: a shallow copy reduced leaves the original alone


def test_add_needs_the_errors_when_the_file_keeps_moments():
    gf = GammaFile.empty(make_schedule("linear", 10), {"digest": "abc"}, moments=True)
    with pytest.raises(ValueError, match="needs the pairs' errors"):
        gf.add(np.array([1]), np.array([0.5]))


def test_merge_tool_says_when_a_format_1_input_drops_the_moments(tmp_path):
    import subprocess
    import sys

    from adpm_dist.gamma import read_gamma
    from tests.estimate_helpers import ROOT

    old, new, new2 = (tmp_path / f"{n}.json" for n in ("old", "new", "new2"))
    old.write_text(make_file("r1", 0, 10, seed=1).to_json())
    new.write_text(make_file("r1", 10, 20, seed=2, moments=True).to_json())
    new2.write_text(make_file("r1", 20, 30, seed=3, moments=True).to_json())
    tool = [sys.executable, str(ROOT / "tools" / "merge_gamma.py")]
    res = subprocess.run([*tool, str(old), str(new), "-o", str(tmp_path / "m.json")], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith(f"warning: {old}: format-1 Γ file(s) without the model-error moments; "
                                 "the merged file has none (format 1)")
    out = json.loads(res.stdout)
    assert out["moments"] is False and out["without_moments"] == [str(old)]
    merged = read_gamma(str(tmp_path / "m.json"))
    assert not merged.has_moments() and merged.count.tolist() == [20] * 10
    res = subprocess.run([*tool, str(new), str(new2), "-o", str(tmp_path / "m2.json")], capture_output=True,
                         text=True)
    assert res.returncode == 0 and res.stderr == "" and json.loads(res.stdout)["moments"] is True
    assert read_gamma(str(tmp_path / "m2.json")).moments.scalars[0, 2] == 200
