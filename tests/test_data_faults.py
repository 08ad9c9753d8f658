"""Bad input: truncated tars, corrupt/wrong-size images, missing fields, wrong keys/buckets."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from adpm_dist.io import data, shards, storage
from tests.tool_modules import load_tool

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)

N = 37
SHARD = 13  # shards of 13, 13, 11
SAMPLE_BYTES = 2048  # each digit: png header+block and cls header+block, 512 bytes each


def _make_shards(folder: str) -> dict:
    make_shards = load_tool("make_shards")
    return make_shards.main(
        ["digits", folder, "--limit", str(N), "--test-fraction", "0", "--shard-size", str(SHARD)]
    )


def _eval_ids(urls: str, **kw) -> tuple[list[int], data.EvalBatches]:
    ev = data.eval_batches(urls, batch_size=8, rank=0, world_size=1, **kw)
    return [i for ids, _ in ev for i in ids.tolist()], ev


# Members are written sorted by extension (webdataset's TarWriter): each sample is its
# .cls (header + 1 block) then its .png (header + 1 block).
@pytest.mark.parametrize("cut, first_lost", [
    (5 * SAMPLE_BYTES + 700, 5),  # inside the 6th sample's .cls block: the 5 before it are whole
    (5 * SAMPLE_BYTES, 4),  # on a member boundary: the 5th sample cannot be told complete
    (5 * SAMPLE_BYTES + 1024 + 700, 5),  # inside the 6th sample's .png data
])
def test_truncated_shard_counted_warned_once_and_limited(tmp_path: Path, caplog, cut: int, first_lost: int):
    """A cut inside a member makes tarfile raise; a cut on a block boundary ends tarfile's
    iteration silently, and only the missing end-of-archive blocks show it. Either way the
    sample the cut went through is never yielded, and every lost sample is counted."""
    folder = str(tmp_path / "d")
    _make_shards(folder)
    shard = Path(folder) / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:cut])
    caplog.set_level(logging.WARNING, logger="adpm_dist.io.data")
    ids, ev = _eval_ids(f"{folder}/train-*.tar", num_workers=0, max_bad_fraction=0.5)
    missing = sorted(set(range(N)) - set(ids))
    lost = SHARD - first_lost
    assert missing == list(range(SHARD + first_lost, 2 * SHARD))  # the samples from the cut on
    assert sorted(ids) == sorted(set(ids))
    assert ev.summary.good == N - lost and dict(ev.summary.bad) == {"truncated": lost}
    assert list(ev.summary.bad_files) == [f"{folder}/train-000001.tar"]
    warnings = [r for r in caplog.records if "train-000001.tar" in r.getMessage()]
    assert len(warnings) == 2  # one for the file, one end-of-pass summary
    assert f"truncated={lost}" in warnings[-1].getMessage()
    with pytest.raises(data.BadDataError, match=rf"train-000001\.tar.*truncated={lost}"):
        _eval_ids(f"{folder}/train-*.tar", num_workers=0, max_bad_fraction=0.05)


def _png(arr: np.ndarray) -> bytes:
    return shards.encode_png(arr)


def _replace_middle_shard_with_bad_samples(folder: str) -> list[int]:
    """Shard 1 keeps its 13 samples, three of them broken; returns the broken ids."""
    url = f"{folder}/train-000001.tar"
    samples = list(data._iter_tar_groups(url))
    samples[2]["png"] = samples[2]["png"][:40] + b"\x00garbage" * 8  # undecodable
    samples[5]["png"] = _png(np.full((16, 16), 200, np.uint8))  # wrong size
    del samples[9]["png"]  # missing field
    shards.write_shard(url, samples)
    return [SHARD + 2, SHARD + 5, SHARD + 9]


def test_bad_images_skipped_and_counted_by_kind(tmp_path: Path):
    folder = str(tmp_path / "d")
    _make_shards(folder)
    broken = _replace_middle_shard_with_bad_samples(folder)
    ids, ev = _eval_ids(f"{folder}/train-*.tar", num_workers=2, max_bad_fraction=0.1)
    assert sorted(ids) == sorted(set(range(N)) - set(broken))
    assert dict(ev.summary.bad) == {"undecodable_image": 1, "wrong_size": 1, "missing_field": 1}
    assert "train-000001.tar" in ev.summary.report()
    with pytest.raises(data.BadDataError, match="undecodable_image=1"):
        _eval_ids(f"{folder}/train-*.tar", num_workers=0, max_bad_fraction=0.0)
    # Training: full epochs regardless; the counts come back from the worker processes.
    s = data.TrainStream(
        f"{folder}/train-*.tar",
        batch_size=4,
        seed=0,
        rank=0,
        world_size=1,
        batches_per_epoch=6,
        num_workers=2,
        shuffle_buffer=8,
        max_bad_fraction=0.2,
    )
    assert len(list(s.epoch(0))) == 6
    assert set(s.summary.bad) <= {"undecodable_image", "wrong_size", "missing_field"}
    assert s.summary.good > 0


def test_training_stops_when_everything_is_bad(tmp_path: Path):
    folder = str(tmp_path / "d")
    _make_shards(folder)
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        url = f"{folder}/{name}"
        samples = list(data._iter_tar_groups(url))
        for s in samples:
            s["png"] = b"not a png"
        shards.write_shard(url, samples)
    s = data.TrainStream(
        f"{folder}/train-*.tar",
        batch_size=4,
        seed=0,
        rank=0,
        world_size=1,
        batches_per_epoch=3,
        num_workers=0,
        shuffle_buffer=8,
    )
    with pytest.raises(data.BadDataError, match="undecodable_image"):
        list(s.epoch(0))


def test_more_samples_than_manifest_says(tmp_path: Path):
    folder = str(tmp_path / "d")
    _make_shards(folder)
    mpath = Path(folder) / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["shards"][-1]["count"] -= 1  # the last shard now holds one sample too many
    mpath.write_text(json.dumps(manifest))
    ids, ev = _eval_ids(f"{folder}/train-*.tar", num_workers=0, max_bad_fraction=0.1)
    assert sorted(ids) == list(range(N - 1))
    assert dict(ev.summary.bad) == {"unexpected_sample": 1}


def test_truncated_shard_in_s3_still_gives_full_epochs(s3_bucket: str):
    out = f"{s3_bucket}/d"
    _make_shards(out)
    url = f"{out}/train-000000.tar"
    storage.write_bytes(url, storage.read_bytes(url)[: 3 * SAMPLE_BYTES + 100])
    s = data.TrainStream(
        f"{out}/train-*.tar",
        batch_size=5,
        seed=5,  # both workers draw the cut shard first with this seed
        rank=1,
        world_size=2,
        batches_per_epoch=8,
        num_workers=2,
        shuffle_buffer=10,
        max_bad_fraction=0.5,
    )
    assert len(list(s.epoch(0))) == 8
    # The cut is inside the 4th sample's first header; the 3rd sample before it cannot be told
    # complete (the tar has no end-of-archive blocks), so each read loses 13 - 2 = 11.
    assert s.summary.bad["truncated"] % 11 == 0 and s.summary.bad["truncated"] > 0
    assert list(s.summary.bad_files) == [url]


def test_wrong_credentials_missing_bucket_and_patterns_fail_before_work(
    s3_server, s3_bucket: str, monkeypatch
):
    out = f"{s3_bucket}/d"
    _make_shards(out)
    with pytest.raises(storage.StorageNotFound, match="bucket 'missing-bucket' does not exist"):
        data.TrainStream(
            "s3://missing-bucket/d/train-*.tar",
            batch_size=2,
            seed=0,
            rank=0,
            world_size=1,
            batches_per_epoch=1,
        )
    with pytest.raises(FileNotFoundError, match=r"val-\*\.tar"):
        data.eval_batches(f"{out}/val-*.tar", batch_size=2, rank=0, world_size=1)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-not-the-secret")
    storage.clear_cache()
    for make in (
        lambda: data.TrainStream(
            f"{out}/train-*.tar", batch_size=2, seed=0, rank=0, world_size=1, batches_per_epoch=1
        ),
        lambda: data.eval_batches(f"{out}/train-{{000000..000002}}.tar", batch_size=2, rank=0, world_size=1),
        lambda: _make_shards(f"{s3_bucket}/other"),
    ):
        with pytest.raises(storage.StorageAccessDenied) as info:
            make()
        msg = str(info.value)
        assert s3_bucket in msg and "access denied" in msg
        assert "definitely-not-the-secret" not in msg and s3_server.secret not in msg
        assert s3_server.key not in msg
    assert not (s3_server.root / s3_bucket[5:] / "other").exists()


def test_credentials_never_in_manifest_output_or_logs(s3_server, s3_bucket: str, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    out = f"{s3_bucket}/d"
    _make_shards(out)
    url = f"{out}/train-000001.tar"
    storage.write_bytes(url, storage.read_bytes(url)[:1000])
    _ids, ev = _eval_ids(f"{out}/train-*.tar", num_workers=0, max_bad_fraction=1.0)
    assert ev.summary.bad_total == SHARD
    captured = capsys.readouterr()
    texts = [
        storage.read_text(f"{out}/manifest.json"),
        captured.out,
        captured.err,
        caplog.text,
        ev.summary.report(),
        json.dumps(ev.summary.to_dict()),
    ]
    assert "train-000001.tar" in caplog.text  # the logs did get the warning
    for text in texts:
        assert s3_server.secret not in text and s3_server.key not in text


def test_training_config_sets_the_bad_sample_limit(tmp_path: Path):
    """data.max_bad_fraction reaches the training stream: 3 broken of 37 (8 %) stops the
    default 1 % limit and passes a 10 % one with a full epoch."""
    from adpm_dist.io import dist
    from adpm_dist.train import config
    from adpm_dist.train import loop as train

    folder = str(tmp_path / "d")
    _make_shards(folder)
    _replace_middle_shard_with_bad_samples(folder)
    model_config = {"resolution": 8, "in_channels": 1}
    cfg = config.Config()
    cfg.data.urls, cfg.data.batch_size, cfg.data.batches_per_epoch = [f"{folder}/train-*.tar"], 4, 20
    cfg.data.num_workers, cfg.data.shuffle_buffer = 0, 8
    cfg.validate()
    limit = r"above the limit of 1.00%.*data\.max_bad_fraction=0\.\d+ or more"
    with pytest.raises(data.BadDataError, match=limit):
        list(train.make_stream(cfg, model_config, dist.DistInfo())[0].epoch(0))
    cfg.data.max_bad_fraction = 0.1
    stream, batches = train.make_stream(cfg, model_config, dist.DistInfo())
    assert batches == 20 and len(list(stream.epoch(0))) == 20  # 80 draws: every sample is seen
    # Each read of the broken shard counts each of its three bad samples once.
    reads = stream.summary.bad["undecodable_image"]
    assert reads >= 1 and dict(stream.summary.bad) == {"undecodable_image": reads, "wrong_size": reads,
                                                        "missing_field": reads}
    cfg.data.max_bad_fraction = 1.0
    with pytest.raises(ValueError, match="data.max_bad_fraction"):
        cfg.validate()


def test_bad_data_errors_name_the_setting_that_would_accept_them(tmp_path: Path):
    """The stage's flag (estimate passes ``--max-bad-fraction``) with a value that accepts what was
    seen so far; without a setting, the message says to fix the files."""
    folder = str(tmp_path / "d")
    _make_shards(folder)
    _replace_middle_shard_with_bad_samples(folder)
    urls = f"{folder}/train-*.tar"
    with pytest.raises(data.BadDataError) as info:
        _eval_ids(urls, num_workers=0, max_bad_fraction=0.0, setting="--max-bad-fraction")
    found = re.search(r"--max-bad-fraction=([0-9.]+) or more would skip them", str(info.value))
    assert found and "train-000001.tar" in str(info.value), str(info.value)
    assert 0 < float(found.group(1)) < 1
    with pytest.raises(data.BadDataError, match="fix or replace the files named"):
        _eval_ids(urls, num_workers=0, max_bad_fraction=0.0)
    ids, _ = _eval_ids(urls, num_workers=0, max_bad_fraction=0.1, setting="--max-bad-fraction")
    assert len(ids) == N - 3
