"""Multi-worker S3 training data, many times in one session (issue 22, item 3).

DataLoader workers that were *forked* from a process whose s3fs/aiobotocore event-loop thread
was running crashed or hung (stops log, "Noticed and left alone"). Workers for remote shards
now start by forkserver with the parent's S3 settings, and the training stream keeps them
across epochs. Here, on the real S3 server: ten fresh two-worker S3 training streams (new
worker processes each time, the event-loop thread alive in this process), then two real
trainings with two workers reading S3, all in one session, each bounded by a timeout.
"""

from __future__ import annotations

import threading

import pytest
import torch

from adpm_dist.io import data, storage
from tests.tool_modules import load_tool

pytestmark = [pytest.mark.slow]

REPEATS = 10


@pytest.fixture
def s3_digits(s3_bucket: str) -> str:
    """Digits shards on the S3 server (shards of 100); the training split's pattern."""
    out = f"{s3_bucket}/digits"
    load_tool("make_shards").main(["digits", out, "--limit", "400", "--shard-size", "100"])
    return f"{out}/train-*.tar"


def _stream(urls: str) -> data.TrainStream:
    return data.TrainStream(urls, batch_size=16, seed=3, rank=0, world_size=1,
                            batches_per_epoch=3, num_workers=2, shuffle_buffer=50)


@pytest.mark.timeout(240)
def test_two_worker_s3_streams_ten_times_then_two_trainings(s3_digits, tmp_path):
    """Streams first (ten, then one over three epochs), then the trainings."""
    _ten_streams_then_persistent_epochs(s3_digits)
    _two_trainings(s3_digits, tmp_path)


def _ten_streams_then_persistent_epochs(s3_digits: str) -> None:
    assert any(t.name == "fsspecIO" for t in threading.enumerate())  # the hazard is present
    first = None
    for _ in range(REPEATS):  # new worker processes every time
        stream = _stream(s3_digits)
        batches = list(stream.epoch(0))
        loader = stream._loader
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
        assert len(batches) == 3 and all(b.shape == (16, 1, 8, 8) for b in batches)
        first = first or batches
        assert all(torch.equal(a, b) for a, b in zip(batches, first))  # same seed, same data
        stream.close()
    # One stream, three epochs: the same workers serve them all, and each epoch equals a
    # fresh stream's (what a resumed run re-creates).
    stream = _stream(s3_digits)
    epochs, pids = [], set()
    for e in range(3):
        epochs.append(list(stream.epoch(e)))
        pids.add(tuple(w.pid for w in stream._loader._iterator._workers))
    assert len(pids) == 1
    for e in (1, 2):
        fresh = list(_stream(s3_digits).epoch(e))
        assert all(torch.equal(a, b) for a, b in zip(epochs[e], fresh))
    assert not torch.equal(epochs[0][0], epochs[1][0])
    stream.close()


def _two_trainings(s3_digits: str, tmp_path) -> None:
    """Real in-process trainings (tiny model, 2 workers reading S3, epochs of 2 batches, a local
    run directory) twice; the second, in the same process, gives the same EMA weights."""
    from adpm_dist.models.io import model_from_bytes
    from adpm_dist.train import loop as train
    from adpm_dist.train.config import preset_path

    emas = []
    for i in range(2):
        run = str(tmp_path / f"r{i}")
        assert train.main([
            "--config", str(preset_path("tiny")), f"data.urls=[{s3_digits}]",
            f"train.run_dir={run}", "train.total_steps=5", "train.ckpt_every=100",
            "data.batch_size=8", "data.num_workers=2", "data.batches_per_epoch=2",
            "data.shuffle_buffer=50", "train.progress=false"]) == 0
        model, _ = model_from_bytes(storage.read_bytes(storage.join(run, "ema.safetensors")))
        emas.append(model.state_dict())
    assert all(torch.equal(emas[0][k], emas[1][k]) for k in emas[0])
