"""``evaluate fid`` on the job core (issue 22 item 1): a rank that fails while extracting
features ends every rank quickly, and the rerun gives the FID of a run never interrupted.

Two ranks are started directly (as ``srun`` would: no torchrun agent kills the peer when one
dies, so a rank left waiting in a collective would show up as a late exit) on a real gloo
process group. The Inception network runs at a few images/s on CPU, so the sets are tiny:
8 reference and 8 sample digits, batches of 2, i.e. 2 + 2 rounds per rank.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from adpm_dist.stages import job
from tests.estimate_helpers import launch_ranks, make_digit_shards

pytestmark = [pytest.mark.timeout(400), pytest.mark.usefixtures("one_thread_module"), pytest.mark.slow]


def fid_argv(folder, out) -> list[str]:
    return ["fid", "--reference", f"{folder}/test-{{000000..000001}}.tar",
            "--samples", f"{folder}/train-{{000000..000001}}.tar", "--out", str(out),
            "--batch-size", "2", "--num-workers", "0", "--no-progress"]


def cache_files(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.startswith("fid-stats-"))


def test_rank1_failing_during_feature_extraction_ends_both_ranks_and_the_rerun_matches(tmp_path):
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    make_digit_shards(str(clean), limit=40, shard_size=4)  # 8 test digits in 2 shards, 32 train in 8
    shutil.copytree(clean, faulty)

    # Round 2 is rank 1's first batch of samples (rounds 0 and 1: its 4 reference digits).
    ranks = launch_ranks(2, "adpm_dist.evaluate", fid_argv(faulty, faulty / "fid.json"),
                         {job.FAIL_RANK_ENV: "1:2"}, timeout=240)
    codes, times = [r[0] for r in ranks], [r[1] for r in ranks]
    print(f"fid, rank 1 round 2: exit codes {codes}, exit times {[round(t, 2) for t in times]} s")
    assert codes == [1, 1], [r[2][-2000:] for r in ranks]
    assert "injected failure" in ranks[1][2] and "Traceback" in ranks[1][2]
    assert "rank 1 failed" in ranks[0][2] and "Traceback" not in ranks[0][2]
    assert max(times) - min(times) < 30 and max(times) < 120
    assert not (faulty / "fid.json").exists() and cache_files(faulty) == []  # nothing half-done left

    rerun = launch_ranks(2, "adpm_dist.evaluate", fid_argv(faulty, faulty / "fid.json"), timeout=240)
    assert [r[0] for r in rerun] == [0, 0], rerun[0][2][-2000:]
    uninterrupted = launch_ranks(2, "adpm_dist.evaluate", fid_argv(clean, clean / "fid.json"), timeout=240)
    assert [r[0] for r in uninterrupted] == [0, 0], uninterrupted[0][2][-2000:]
    got = json.loads((faulty / "fid.json").read_text())
    want = json.loads((clean / "fid.json").read_text())
    assert got["num_samples"] == got["num_reference"] == 8 and not got["reference_stats_cached"]
    assert got["fid"] == want["fid"] > 0  # same ranks, same batches: the same bits
    assert cache_files(faulty) == cache_files(clean) != []


def test_a_hung_rank_is_named_by_the_collective_timeout_flag(tmp_path):
    """``evaluate fid --collective-timeout 5``: rank 1 hangs in its 2nd round; both ranks end
    (status 1) within 30 s of the fault, rank 0 with the line naming rank 1, nothing written."""
    import re
    import time

    folder = tmp_path / "digits"
    make_digit_shards(str(folder), limit=40, shard_size=4)
    start = time.time()
    ranks = launch_ranks(2, "adpm_dist.evaluate", [*fid_argv(folder, folder / "fid.json"),
                                                   "--collective-timeout", "5"],
                         {job.FAIL_RANK_ENV: "1:1:hang"}, timeout=240)
    codes, times = [r[0] for r in ranks], [r[1] for r in ranks]
    print(f"fid, rank 1 hangs in round 1: exit codes {codes}, exit times {[round(t, 2) for t in times]} s")
    assert codes == [1, 1], [r[2][-2000:] for r in ranks]
    # the watchdog looks about twice a second, so the wait it reports is 5 s or a little more
    line0 = ranks[0][2]
    assert re.search(r"collective timeout after [5-9] s: rank 1 did not arrive", line0), line0[-2000:]
    assert "collective timeout" in ranks[1][2], ranks[1][2][-2000:]  # the hung rank ends too
    fault = float(re.search(r"adpm-test: injected .* t=([0-9.]+)", ranks[1][2]).group(1))
    assert start + max(times) - fault < 30
    assert not (folder / "fid.json").exists() and cache_files(folder) == []
