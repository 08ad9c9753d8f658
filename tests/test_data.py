"""data.py: evaluation coverage, training determinism, S3 integration, against real shards."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from adpm_dist.io import data, shards
from tests.tool_modules import load_tool

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(180)


make_shards = load_tool("make_shards")
N_SMALL = 37  # a prime: shard counts come out uneven for every shard size


def _digits_uint8() -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.rint(load_digits().images * 255 / 16).astype(np.uint8)


def _as_tensor(img: np.ndarray) -> torch.Tensor:
    """The documented convention, computed independently of data.to_tensor."""
    return torch.tensor(img, dtype=torch.float64)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[int, str]:
    """n_shards -> folder of N_SMALL digits split into exactly that many shards."""
    root = tmp_path_factory.mktemp("sets")
    out = {}
    for n_shards in range(1, 9):
        folder = str(root / f"s{n_shards}")
        make_shards.main(
            [
                "digits",
                folder,
                "--limit",
                str(N_SMALL),
                "--test-fraction",
                "0",
                "--shard-size",
                str(math.ceil(N_SMALL / n_shards)),
            ]
        )
        assert len(shards.read_manifest(folder)["shards"]) == n_shards
        out[n_shards] = folder
    return out


def test_eval_covers_every_sample_exactly_once(sets, monkeypatch):
    """1..5 ranks × 0..3 workers × 1..8 shards, ranks given through RANK/WORLD_SIZE.

    Workers are run in-process (iter_worker with each worker id), which is what each
    DataLoader worker process executes; test_eval_with_real_worker_processes runs the
    processes themselves.
    """
    digits = _digits_uint8()[:N_SMALL]
    expected = torch.stack([_as_tensor(d) for d in digits])
    for n_shards, folder in sets.items():
        urls = f"{folder}/train-*.tar"
        for world in range(1, 6):
            for workers in range(0, 4):
                seen: list[int] = []
                for rank in range(world):
                    monkeypatch.setenv("RANK", str(rank))
                    monkeypatch.setenv("WORLD_SIZE", str(world))
                    ev = data.eval_batches(urls, batch_size=4, num_workers=workers)
                    parts = (
                        [iter(ev)]
                        if workers == 0
                        else [ev.dataset.iter_worker(w, workers) for w in range(workers)]
                    )
                    for part in parts:
                        for item in part:
                            ids, images = item[0], item[1]
                            assert images.shape[1:] == (1, 8, 8) and len(ids) <= 4
                            assert torch.equal(images, expected[ids])
                            seen.extend(ids.tolist())
                assert sorted(seen) == list(range(N_SMALL)), (n_shards, world, workers)


@pytest.mark.timeout(120)
def test_eval_with_real_worker_processes(sets):
    """More ranks × workers (2 × 3) than shards (2): every id once, none empty-handed errors."""
    seen = []
    for rank in range(2):
        ev = data.eval_batches(
            f"{sets[2]}/train-{{000000..000001}}.tar", batch_size=5, rank=rank, world_size=2, num_workers=3
        )
        mine = []
        for ids, images in ev:
            mine.extend(ids.tolist())
            assert images.dtype == torch.float32
        assert ev.summary.good == len(mine) and ev.summary.bad_total == 0
        seen.extend(mine)
    assert sorted(seen) == list(range(N_SMALL))


@pytest.mark.timeout(120)
def test_train_stream_equal_batches_deterministic_and_resumable(sets):
    digits = _digits_uint8()[:N_SMALL]
    allowed = {_as_tensor(d).numpy().tobytes() for d in digits}
    allowed |= {_as_tensor(d[:, ::-1].copy()).numpy().tobytes() for d in digits}
    urls = f"{sets[3]}/train-*.tar"

    def stream(rank: int, world: int = 3, seed: int = 5, workers: int = 2) -> data.TrainStream:
        return data.TrainStream(
            urls,
            batch_size=6,
            seed=seed,
            rank=rank,
            world_size=world,
            batches_per_epoch=5,
            num_workers=workers,
            hflip=True,
            shuffle_buffer=20,
        )

    per_rank = [list(stream(r).epoch(0)) for r in range(3)]
    assert [len(b) for b in per_rank] == [5, 5, 5]  # equal counts: DDP never waits forever
    for batches in per_rank:
        for b in batches:
            assert b.shape == (6, 1, 8, 8) and b.dtype == torch.float32
            assert all(x.numpy().tobytes() in allowed for x in b)  # real digits or their flips
    again = list(stream(0).epoch(0))
    assert all(torch.equal(a, b) for a, b in zip(again, per_rank[0]))  # same seed, same data
    assert not torch.equal(per_rank[0][0], per_rank[1][0])  # ranks differ
    assert not torch.equal(list(stream(0).epoch(1))[0], per_rank[0][0])  # epochs differ
    assert not torch.equal(list(stream(0, seed=6).epoch(0))[0], per_rank[0][0])
    # Resume mid-epoch: a fresh stream, skip the 3 batches done, get exactly the rest.
    resumed = list(stream(0).epoch(0))[3:]
    assert all(torch.equal(a, b) for a, b in zip(resumed, per_rank[0][3:]))
    # Single process (no workers) also gives exactly batches_per_epoch.
    assert len(list(stream(0, workers=0).epoch(0))) == 5
    flips = sum(
        x.numpy().tobytes() not in {_as_tensor(d).numpy().tobytes() for d in digits}
        for b in per_rank[0]
        for x in b
    )
    assert 0 < flips < 30  # hflip on: some, not all (30 samples; a digit is rarely symmetric)


def test_shard_draws_are_seeded_and_cover_the_shards():
    """webdataset's ResampledShards with our seed: a function of (seed, epoch, rank, worker) only."""
    urls = [f"s{i}.tar" for i in range(3)]

    def draws(*key: int, n: int = 300) -> list[str]:
        it = data.shard_draws(urls, *key)
        return [next(it) for _ in range(n)]

    first = draws(7, 0, 1, 0)
    assert first == draws(7, 0, 1, 0)  # reproducible, in this process and (no pid/time) any other
    for other in ((8, 0, 1, 0), (7, 1, 1, 0), (7, 0, 2, 0), (7, 0, 1, 1)):
        assert draws(*other, n=20) != first[:20], other
    assert all(first.count(u) > 60 for u in urls)  # with replacement, all shards (expected 100 each)


def test_train_stream_more_ranks_than_shards(sets):
    """One shard, 4 ranks: resampling means every rank still gets its full epoch."""
    for rank in range(4):
        s = data.TrainStream(
            f"{sets[1]}/train-000000.tar",
            batch_size=8,
            seed=0,
            rank=rank,
            world_size=4,
            batches_per_epoch=7,
            num_workers=0,
            shuffle_buffer=10,
        )
        assert sum(1 for _ in s.epoch(0)) == 7


def test_values_on_the_256_level_grid(sets):
    ev = data.eval_batches(f"{sets[1]}/train-*.tar", batch_size=64, rank=0, world_size=1, num_workers=0)
    _ids, x = next(iter(ev))
    v = (x.double() + 1) * 127.5
    assert torch.allclose(v, v.round(), atol=1e-4) and x.min() >= -1 and x.max() <= 1
    assert x.min() == -1 and x.max() == 1  # digits use the full range


def test_expand_urls(sets):
    folder = sets[3]
    names = [f"{folder}/train-00000{i}.tar" for i in range(3)]
    assert shards.expand_urls(f"{folder}/train-{{000000..000002}}.tar") == names
    assert shards.expand_urls(f"{folder}/train-*.tar") == names
    assert shards.expand_urls(f"{names[0]},{folder}/train-{{000001,000002}}.tar") == names
    assert shards.expand_urls(folder) == names
    assert shards.expand_urls(names) == names
    with pytest.raises(FileNotFoundError, match=r"val-\*\.tar.*matches nothing"):
        shards.expand_urls(f"{folder}/val-*.tar")
    with pytest.raises(FileNotFoundError, match="train-000007.tar"):
        shards.expand_urls(f"{folder}/train-{{000000..000007}}.tar")


@pytest.mark.timeout(120)
def test_s3_integration_pixels_keys_and_manifest(s3_server, s3_bucket: str):
    """make_shards → rclone S3 → both streams; compared with the source digits."""
    out = f"{s3_bucket}/digits"
    manifest = make_shards.main(
        ["digits", out, "--limit", "150", "--shard-size", "40", "--test-fraction", "0.2"]
    )
    for entry in manifest["shards"]:  # the server holds exactly the bytes the manifest describes
        blob = (s3_server.root / s3_bucket[5:] / "digits" / entry["name"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
    digits = _digits_uint8()[:150]
    train_idx, test_idx = make_shards.split_indices(150, 0.2, 0)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        seen = []
        for rank in range(2):
            ev = data.eval_batches(
                f"{out}/{split}-*.tar", batch_size=16, rank=rank, world_size=2, num_workers=2
            )
            for ids, images in ev:
                for gid, img in zip(ids.tolist(), images):
                    assert torch.equal(img, _as_tensor(digits[idx[gid]]))
                seen.extend(ids.tolist())
            assert ev.summary.bad_total == 0
        assert sorted(seen) == list(range(len(idx)))
    keys = [s["__key__"] for s in data._iter_tar_groups(f"{out}/test-000000.tar")]
    assert keys == [f"test_{i:08d}" for i in range(30)]
    s = data.TrainStream(
        f"{out}/train-*.tar",
        batch_size=10,
        seed=1,
        rank=0,
        world_size=1,
        batches_per_epoch=4,
        num_workers=2,
        shuffle_buffer=30,
    )
    batches = list(s.epoch(0))
    assert len(batches) == 4 and all(b.shape == (10, 1, 8, 8) for b in batches)
    allowed = {_as_tensor(digits[i]).numpy().tobytes() for i in train_idx}
    assert all(x.numpy().tobytes() in allowed for b in batches for x in b)


def test_webdataset_reads_and_writes_s3_through_our_handler(s3_bucket: str):
    """data.py registers s3:// in webdataset.gopen at import: wds's own writer and reader work."""
    import webdataset as wds

    pattern = f"{s3_bucket}/wds/shard-%06d.tar"
    with wds.ShardWriter(pattern, maxcount=3, verbose=0) as sink:
        for i in range(7):
            sink.write({"__key__": f"s{i:03d}", "cls": str(i)})
    urls = shards.expand_urls(f"{s3_bucket}/wds/shard-{{000000..000002}}.tar")
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)
    assert [int(s["cls"]) for s in ds] == list(range(7))
