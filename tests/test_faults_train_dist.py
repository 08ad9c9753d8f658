"""Bad data on ONE rank of a 2-rank torchrun: both ranks checkpoint the step reached together
and exit 2 (the other rank must not hang in the next collective)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from adpm_dist.io import data, shards
from tests.tool_modules import load_tool

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 3  # of 20 samples each


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_shard(seed: int, rank: int) -> int:
    """The shard a rank's epoch 0 reads first (io/data.py: webdataset's ResampledShards seeded
    by (seed, epoch, rank, worker))."""
    return int(next(data.shard_draws([str(i) for i in range(SHARDS)], seed, 0, rank, 0)))


@pytest.mark.timeout(300)
def test_bad_data_on_one_rank_checkpoints_both_and_exits_2(tmp_path):
    folder = tmp_path / "d"
    load_tool("make_shards").main(["digits", str(folder), "--limit", str(20 * SHARDS),
                                   "--test-fraction", "0", "--shard-size", "20"])
    # A seed where the ranks start on different shards; break a sample that only rank 0 reads
    # in epoch 0 (3 batches of 2 after a buffer of 4: the first 10 samples of its first shard).
    seed = next(s for s in range(100) if _first_shard(s, 0) != _first_shard(s, 1))
    url = folder / f"train-{_first_shard(seed, 0):06d}.tar"
    samples = list(data._iter_tar_groups(str(url)))
    samples[1]["png"] = b"not a png"
    shards.write_shard(str(url), samples)
    run = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "adpm_dist.train", "--preset", "tiny", f"data.urls=[{folder}/train-*.tar]",
         f"train.run_dir={run}", f"train.seed={seed}", "data.batch_size=4",
         "data.batches_per_epoch=3", "data.shuffle_buffer=4", "train.total_steps=8",
         "train.ckpt_every=100", "train.progress=false"],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, out
    assert any("step 3" in e and "undecodable_image=1" in e and url.name in e for e in errors), out
    assert any("step 3" in e and "bad input on another rank" in e for e in errors), out
    assert "exitcode  : 2" in out or "exitcode: 2" in out.replace(" ", ""), out
    assert json.loads((run / "latest.json").read_text())["step"] == 3
