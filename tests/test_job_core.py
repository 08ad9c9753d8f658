"""The sharded-job core (issue 13): any rank's failure ends every rank quickly; reruns finish the job.

Ranks are started directly (as ``srun`` would, with no torchrun agent killing the
others when one dies) on a real gloo process group of 3. Each fault test checks
every rank's exit status, that all ranks are gone within 30 s of the first exit
(not the 600 s collective timeout), and that a rerun gives the uninterrupted file.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from adpm_dist.gamma import read_gamma
from adpm_dist.stages import estimate, job
from tests.estimate_helpers import launch_ranks, tiny_job_inputs

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_thread_module"), pytest.mark.slow]

EXIT_TIMES: dict[str, list[float]] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    inputs = tiny_job_inputs(tmp_path_factory.mktemp("job"))
    ref = inputs["base"] / "ref.json"
    ranks = launch_ranks(3, "adpm_dist.estimate", args(inputs, ref))
    assert [r[0] for r in ranks] == [0, 0, 0], ranks[0][2][-2000:]
    return {**inputs, "ref": read_gamma(str(ref))}


def args(setup, out, *extra):
    return ["--checkpoint", setup["model"], "--data", setup["data"], "--out", str(out), "--num-workers", "0",
            "--no-progress", "--timesteps", "1-20", "--data-batch", "2", "--flush-every", "1",
            "--batch-size", "16", *extra]


def check_fault(name: str, ranks, failed: int, status: int) -> None:
    codes = [r[0] for r in ranks]
    times = [r[1] for r in ranks]
    EXIT_TIMES[name] = times
    print(f"{name}: exit codes {codes}, exit times {[round(t, 2) for t in times]} s, "
          f"spread {max(times) - min(times):.2f} s")
    assert codes[failed] == status, ranks[failed][2][-3000:]
    for rank, (code, _, err) in enumerate(ranks):
        assert code != 0
        if rank != failed:
            assert code == status and f"rank {failed} failed" in err, err[-3000:]
            assert "Traceback" not in err  # one line, not gloo noise
    assert max(times) - min(times) < 30 and max(times) < 120


def assert_same_file(out, ref) -> None:
    got = read_gamma(str(out))
    np.testing.assert_array_equal(got.count, ref.count)
    np.testing.assert_array_equal(got.sum, ref.sum)
    np.testing.assert_array_equal(got.sum_sq, ref.sum_sq)


def test_rank0_failing_in_the_final_write_ends_every_rank(setup, tmp_path):
    out = tmp_path / "g.json"
    ranks = launch_ranks(3, "adpm_dist.estimate", args(setup, out), {job.FAIL_RANK_ENV: "0:write"})
    check_fault("rank 0 final write", ranks, failed=0, status=1)
    assert "injected failure" in ranks[0][2] and "Traceback" in ranks[0][2]
    assert not out.exists() and os.listdir(str(out) + ".partial")  # partial state kept for the rerun
    assert [r[0] for r in launch_ranks(3, "adpm_dist.estimate", args(setup, out))] == [0, 0, 0]
    assert_same_file(out, setup["ref"])


def test_rank2_failing_mid_round_ends_every_rank(setup, tmp_path):
    out = tmp_path / "g.json"
    ranks = launch_ranks(3, "adpm_dist.estimate", args(setup, out), {job.FAIL_RANK_ENV: "2:3"})
    check_fault("rank 2 mid-round", ranks, failed=2, status=1)
    assert not out.exists()
    assert [r[0] for r in launch_ranks(3, "adpm_dist.estimate", args(setup, out))] == [0, 0, 0]
    assert_same_file(out, setup["ref"])


def test_bad_data_on_one_rank_is_a_user_error_everywhere(setup, tmp_path):
    shard = os.path.join(setup["folder"], "test-000001.tar")  # rank 1's share: ids 20..39
    good = open(shard, "rb").read()
    out = tmp_path / "g.json"
    try:
        with open(shard, "wb") as f:
            f.write(good[:100])  # cut inside the first header: every sample of the shard is lost
        ranks = launch_ranks(3, "adpm_dist.estimate", args(setup, out))
    finally:
        with open(shard, "wb") as f:
            f.write(good)
    check_fault("rank 1 bad data", ranks, failed=1, status=2)
    assert "error:" in ranks[1][2] and "test-000001.tar" in ranks[1][2] and "Traceback" not in ranks[1][2]
    assert [r[0] for r in launch_ranks(3, "adpm_dist.estimate", args(setup, out))] == [0, 0, 0]
    assert_same_file(out, setup["ref"])


def test_sample_and_nll_final_write_failures_end_every_rank(setup, tmp_path):
    """The same core under ``sample`` (manifest write) and ``evaluate nll`` (nll.json write)."""
    import json

    from adpm_dist.stages import evaluate, sample

    smp = ["--checkpoint", setup["model"], "--method", "ddim", "--steps", "3", "--num-samples", "6",
           "--shard-size", "2", "--batch-size", "2", "--no-progress"]
    nll = ["nll", "--checkpoint", setup["model"], "--data", setup["data"], "--steps", "3", "--methods",
           "ddpm-beta,ddpm-tilde", "--limit", "12", "--batch-size", "2", "--flush-every", "1",
           "--num-workers", "0", "--no-progress"]
    for name, module, argv, marker in (("sample", "adpm_dist.sample", smp, "manifest.json"),
                                       ("nll", "adpm_dist.evaluate", nll, "nll.json")):
        out = tmp_path / name
        ranks = launch_ranks(3, module, [*argv, "--out", str(out)], {job.FAIL_RANK_ENV: "0:write"})
        check_fault(f"{name}: rank 0 final write", ranks, failed=0, status=1)
        assert not (out / marker).exists()
        assert [r[0] for r in launch_ranks(3, module, [*argv, "--out", str(out)])] == [0, 0, 0]
        ref = tmp_path / f"{name}-ref"
        main = sample.main if name == "sample" else evaluate.main
        assert main([*argv, "--out", str(ref)]) == 0  # one process, uninterrupted
        if name == "sample":
            for shard in sorted(p.name for p in ref.glob("samples-*.tar")):
                assert (out / shard).read_bytes() == (ref / shard).read_bytes()
        else:
            got, want = (json.loads((d / marker).read_text())["results"] for d in (out, ref))
            for key in want:
                assert got[key]["bpd"] == pytest.approx(want[key]["bpd"], rel=1e-12)
                assert got[key]["count"] == want[key]["count"] == 12


def test_together_reraises_alone_and_progress_is_silent_off_rank0(capsys):
    with pytest.raises(KeyError):
        job.together(lambda: {}["x"])
    assert job.together(lambda: 7) == 7
    with job.Progress(False, "x", 10) as bar:
        bar.update(5)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28), (2, 2, 2), (1, 3, 3)])
def test_noise_of_some_rows_equals_those_rows_of_the_full_block(shape):
    """Drawing only the asked rows of a block gives exactly those rows of the full 16-row draw."""
    for sample_id, block in ((0, 0), (17, 3)):
        g = torch.Generator()
        g.manual_seed(estimate._seed_for(5, sample_id, block))
        full = torch.randn((estimate.NOISE_BLOCK, *shape), generator=g)  # the original, full draw
        for offsets in ([0], [15], [0, 1], [3, 4, 5, 11], [2, 9, 15], list(range(16))):
            got = estimate.pair_noise(5, sample_id, block, shape, "cpu", offsets)
            assert got.shape == (len(offsets), *shape)
            assert torch.equal(got, full[offsets])
    assert estimate.partial_draw_exact((1, 8, 8), "cpu") and not estimate.partial_draw_exact((2, 2, 2), "cpu")
    assert estimate._runs([0, 1, 5, 7, 8]) == [(0, 2), (5, 1), (7, 2)]


def test_a_resumed_nll_job_says_so_through_the_default_hook(setup, tmp_path, monkeypatch, capsys):
    """The job core prints the resume line for every stage with partial state (here evaluate nll,
    which does not override ShardedJob.resume_summary)."""
    from adpm_dist.stages import evaluate

    argv = ["nll", "--checkpoint", setup["model"], "--data", setup["data"], "--steps", "3", "--methods",
            "ddpm-beta", "--limit", "6", "--batch-size", "2", "--flush-every", "1", "--num-workers", "0",
            "--no-progress", "--out", str(tmp_path / "nll")]
    monkeypatch.setenv(job.FAIL_RANK_ENV, "0:write")
    with pytest.raises(RuntimeError, match="injected failure"):
        evaluate.main(argv)  # every round done, the final write fails: the partial state stays
    monkeypatch.delenv(job.FAIL_RANK_ENV)
    capsys.readouterr()
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'nll' / 'nll.partial'}: 6/6 done (NLL (test images))" in out, out
    assert evaluate.main(argv) == 0  # finished: no resume line, nothing redone
    out = capsys.readouterr().out
    assert "already complete" in out and "resumed from" not in out
