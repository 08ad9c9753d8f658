"""The sharded Γ job (issue 5): invariances, resume, no-op rerun, merge, real S3 — for Γ and for the
model-error moments the job keeps alongside (format "adpm-gamma/2")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adpm_dist.gamma import read_gamma, write_gamma
from adpm_dist.stages import estimate
from tests.estimate_helpers import (
    ROOT,
    make_digit_shards,
    save_tiny_model,
    tiny_job_inputs,
    torchrun,
)
from tests.s3_server import subprocess_env

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread_module")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_inputs(tmp_path_factory.mktemp("est"))


def common(setup, out, *extra):
    return ["--checkpoint", setup["model"], "--data", setup["data"], "--out", str(out),
            "--num-workers", "0", "--no-progress", *extra]


def test_single_process_file_is_complete_and_consistent(setup, tmp_path):
    out = tmp_path / "g.json"
    assert estimate.main(common(setup, out, "--batch-size", "64")) == 0
    gf = read_gamma(str(out))
    assert gf.is_complete() and set(gf.count.tolist()) == {60}  # 20% of 300 digits, every t
    assert 0 < gf.gamma.min() and np.all(gf.stderr > 0)
    assert gf.has_moments() and json.loads(out.read_text())["format"] == "adpm-gamma/3"
    assert gf.half is not None and 0 < gf.half.count.min() < gf.count.min()  # the halves (sample-id parity)
    m = gf.error_moments()
    assert np.all(np.isfinite(m.a[1:])) and np.all(np.isfinite(m.c[1:])) and np.isfinite(m.decoder_nll)
    assert np.all(m.a[1:] <= gf.error_moments(clip_x0=False).a[1:])  # clamping to the data range helps
    assert gf.extra["evaluations_per_s"] > 0
    ranges = sorted(c["samples"] for c in gf.contributions)
    assert ranges == [[0, 60]]
    assert not os.path.exists(str(out) + ".partial") or not os.listdir(str(out) + ".partial")


@pytest.mark.slow
def test_world_size_batch_size_and_worker_invariance(setup, tmp_path):
    """fp64 network: everything else (noise, assignment, accumulation) is exactly invariant."""
    one = tmp_path / "one.json"
    assert estimate.main(common(setup, one, "--batch-size", "64", "--precision", "fp64")) == 0
    three = tmp_path / "three.json"
    res = torchrun(3, common(setup, three, "--batch-size", "48", "--data-batch", "5", "--num-workers", "2",
                             "--precision", "fp64"))
    assert res.returncode == 0, res.stderr[-3000:]
    other = tmp_path / "other.json"
    assert estimate.main(common(setup, other, "--batch-size", "7", "--data-batch", "3",
                                "--precision", "fp64")) == 0
    a, b, c = (read_gamma(str(p)) for p in (one, three, other))
    for g in (b, c):
        np.testing.assert_array_equal(g.count, a.count)
        np.testing.assert_allclose(g.sum, a.sum, rtol=1e-12, atol=0)
        np.testing.assert_allclose(g.sum_sq, a.sum_sq, rtol=1e-12, atol=0)
        assert_same_moments(g, a, rtol=1e-12)
    assert {c["rank"] for c in b.contributions} == {0, 1, 2}
    # In fp32 the CPU kernels round differently per batch size (~1e-7); nothing more.
    fp32 = tmp_path / "fp32.json"
    assert estimate.main(common(setup, fp32, "--batch-size", "7", "--data-batch", "3")) == 0
    np.testing.assert_allclose(read_gamma(str(fp32)).sum, a.sum, rtol=1e-6)


def test_more_samples_per_t_than_data_uses_fresh_noise(setup, tmp_path):
    out = tmp_path / "g.json"
    assert estimate.main(common(setup, out, "--samples-per-t", "150", "--timesteps", "1,5-7,20")) == 0
    gf = read_gamma(str(out), require_complete=False)
    assert gf.count[[0, 4, 5, 6, 19]].tolist() == [150] * 5 and gf.count.sum() == 750
    assert [c["samples"] for c in gf.contributions] == [[0, 150]]  # pair-sample ids 0..149


def test_rerun_of_finished_job_is_a_noop_and_other_jobs_are_refused(setup, tmp_path, capsys):
    out = tmp_path / "g.json"
    assert estimate.main(common(setup, out, "--timesteps", "1-20")) == 0
    before = out.read_bytes()
    mtime = out.stat().st_mtime_ns
    assert estimate.main(common(setup, out, "--timesteps", "1-20")) == 0
    assert "already complete" in capsys.readouterr().out
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime
    assert estimate.main(common(setup, out, "--timesteps", "1-20", "--seed", "5")) == 2
    assert "holds a different estimate" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_a_format_1_file_or_partial_state_without_moments_is_not_taken_as_this_job(setup, tmp_path, capsys,
                                                                                   monkeypatch):
    """Written by the version before the moments: never 'already complete' (the moments would be
    missing), never resumed (they would miss the earlier pairs), never overwritten."""
    from adpm_dist.stages import job

    out = tmp_path / "g.json"
    args = common(setup, out, "--timesteps", "1-3", "--flush-every", "1", "--data-batch", "8")
    assert estimate.main(args) == 0
    old = read_gamma(str(out), require_complete=False)
    old.moments = None  # the same estimate as the earlier version wrote it: format 1
    write_gamma(old, str(out))
    before = out.read_bytes()
    capsys.readouterr()
    assert estimate.main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {out} holds this estimate as a format-1 Γ file, without the model-error moments" in err
    assert "choose another --out or remove it" in err and out.read_bytes() == before

    out.unlink()
    monkeypatch.setenv(job.FAIL_RANK_ENV, "0:2")
    with pytest.raises(RuntimeError, match="injected failure"):
        estimate.main(args)  # two rounds done and saved, then the job dies
    monkeypatch.delenv(job.FAIL_RANK_ENV)
    state_file = tmp_path / "g.json.partial" / "rank-00000-of-00001.json"
    state = json.loads(state_file.read_text())
    assert state["units_done"] == 2 and len(state["moments"]) == 5 * 2 * 20 + 9
    del state["moments"]  # partial state as the earlier version wrote it
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert estimate.main(args) == 2
    err = capsys.readouterr().err
    assert f"{state_file}: unreadable partial state (written by a version without the model-error " in err
    assert "delete it to start over" in err and not out.exists()


@pytest.mark.slow
def test_kill_minus_9_then_rerun_gives_the_uninterrupted_result(setup, tmp_path):
    args = ["--timesteps", "all", "--data-batch", "2", "--flush-every", "1", "--batch-size", "16"]
    ref = tmp_path / "ref.json"
    res = torchrun(2, common(setup, ref, *args))
    assert res.returncode == 0, res.stderr[-3000:]

    out = tmp_path / "killed.json"
    cmd_args = common(setup, out, *args)
    # Rank 1 sends itself SIGKILL at its round 3 (the injection hook), after three flushes of
    # partial state: the same signal as an outside kill -9, at a point the job cannot outrun.
    killed = torchrun(2, cmd_args, env=dict(os.environ, ADPM_TEST_FAIL_RANK="1:3:kill"))
    assert killed.returncode != 0 and not out.exists(), killed.stderr[-3000:]
    assert "injected kill on rank 1 at 3" in killed.stderr
    states = [json.loads(p.read_text()) for p in (tmp_path / "killed.json.partial").glob("*.json")]
    assert states and all(s["units_done"] >= 3 for s in states), states
    res = torchrun(2, cmd_args)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_gamma(str(ref)), read_gamma(str(out))
    np.testing.assert_array_equal(b.count, a.count)
    np.testing.assert_array_equal(b.sum, a.sum)
    np.testing.assert_array_equal(b.sum_sq, a.sum_sq)
    assert_same_moments(b, a, rtol=0)  # the partial state carried the moments' sums too
    assert sorted(map(tuple, (c["samples"] for c in b.contributions))) == sorted(
        map(tuple, (c["samples"] for c in a.contributions)))


def assert_same_moments(got, want, rtol: float) -> None:
    """Equal model-error moment sums (rtol 0: bit for bit); scalar counts exactly."""
    assert got.has_moments() and want.has_moments()
    for g, w in ((got.moments.per_t, want.moments.per_t), (got.moments.scalars, want.moments.scalars)):
        if rtol:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=0)
        else:
            np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(got.moments.scalars[:, 2], want.moments.scalars[:, 2])
    if got.half is not None or want.half is not None:  # format 3: half A's sums alike
        assert got.half is not None and want.half is not None
        np.testing.assert_array_equal(got.half.count, want.half.count)
        for g, w in ((got.half.sum, want.half.sum), (got.half.moments.per_t, want.half.moments.per_t)):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=0)


def test_merge_of_disjoint_runs_equals_one_run_over_the_union(setup, tmp_path):
    whole = tmp_path / "whole.json"
    assert estimate.main(common(setup, whole, "--samples-per-t", "120")) == 0
    # Two runs over disjoint timestep sets (same seed and data: no shared draws) add up to the whole run:
    # the noise of a pair depends on (seed, sample id, t) only.
    lo, hi = tmp_path / "lo.json", tmp_path / "hi.json"
    assert estimate.main(common(setup, lo, "--timesteps", "1-10", "--samples-per-t", "120")) == 0
    assert estimate.main(common(setup, hi, "--timesteps", "11-20", "--samples-per-t", "120")) == 0
    merged = tmp_path / "merged.json"
    merge = [sys.executable, str(ROOT / "tools" / "merge_gamma.py"), str(lo), str(hi), "-o", str(merged),
             "--allow-incomplete"]
    res = subprocess.run(merge, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["samples_per_t_min"] == 120
    a, m = read_gamma(str(whole)), read_gamma(str(merged))
    np.testing.assert_array_equal(m.count, a.count)
    np.testing.assert_allclose(m.sum, a.sum, rtol=1e-13)
    assert_same_moments(m, a, rtol=1e-13)
    # The same run twice overlaps and is refused.
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "merge_gamma.py"), str(whole), str(whole),
                          "-o", str(tmp_path / "dup.json")], capture_output=True, text=True)
    assert res.returncode == 2 and "twice" in res.stderr


def test_merge_refuses_another_model(setup, tmp_path):
    other_model = str(tmp_path / "other.safetensors")
    save_tiny_model(other_model, seed=1)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert estimate.main(common(setup, a, "--timesteps", "1-3")) == 0
    args = common(setup, b, "--timesteps", "1-3", "--seed", "1")
    args[1] = other_model
    assert estimate.main(args) == 0
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "merge_gamma.py"), str(a), str(b), "-o",
                          str(tmp_path / "m.json"), "--allow-incomplete"], capture_output=True, text=True)
    assert res.returncode == 2 and "model" in res.stderr


def test_bad_arguments_fail_clearly(setup, tmp_path, capsys):
    assert estimate.main(common(setup, tmp_path / "g.json", "--timesteps", "0-3")) == 2
    assert "1..20" in capsys.readouterr().err
    args = common(setup, tmp_path / "g.json")
    args[1] = str(tmp_path / "nothing-here")
    assert estimate.main(args) == 2
    assert "nothing-here" in capsys.readouterr().err


def test_data_and_output_on_the_local_s3_server(setup, s3_server, s3_bucket, tmp_path):
    shards = make_digit_shards(f"{s3_bucket}/shards", limit=300, shard_size=20)
    model = f"{s3_bucket}/tiny.safetensors"
    save_tiny_model(model)
    out = f"{s3_bucket}/gamma/g.json"
    args = ["--checkpoint", model, "--data", shards, "--out", out, "--num-workers", "1", "--no-progress",
            "--timesteps", "1-20"]
    res = torchrun(2, args, env=subprocess_env(s3_server))
    assert res.returncode == 0, res.stderr[-3000:]
    gf = read_gamma(out)
    local = tmp_path / "local.json"
    assert estimate.main(common(setup, local, "--timesteps", "1-20")) == 0
    np.testing.assert_allclose(gf.sum, read_gamma(str(local)).sum, rtol=1e-6)  # fp32 network
    assert s3_server.secret not in json.dumps(gf.to_dict())


def test_timesteps_can_name_the_trajectories_to_serve():
    from adpm_dist.diffusion.trajectory import even_trajectory, quadratic_trajectory

    got = estimate.parse_timesteps("even:10,25", 1000)
    want = sorted(set(even_trajectory(1000, 10)) | set(even_trajectory(1000, 25)))
    assert got.tolist() == want and len(got) == len(set(got))
    assert estimate.parse_timesteps("quadratic:7", 200).tolist() == quadratic_trajectory(200, 7).tolist()
    assert estimate.parse_timesteps("3,1,5-7", 10).tolist() == [1, 3, 5, 6, 7]
    for bad, msg in (("even:1", "2 <= K <= N=1000"), ("optimal:10", "even:K"), ("even:x", "even:x")):
        with pytest.raises(ValueError, match=msg):
            estimate.parse_timesteps(bad, 1000)
