"""WebDataset interoperability, both ways, on the real S3 server (tests/s3_server.py).

- shards written by tools/make_shards.py are read by a plain ``webdataset.WebDataset``
  pipeline: same keys, same pixels and classes as the source, as many samples as the
  manifest says;
- shards written by a plain ``webdataset.ShardWriter`` (``.png`` + ``.cls`` + ``.json``), and
  by a plain ``tarfile`` writer with every member order and a ``.jpg`` image, are read by our
  training and evaluation streams, compared with what was written (decoded by PIL here).

webdataset 1.0.2 has no s3:// opener; ``import adpm_dist.io.data`` registers ours, and the
subprocess test shows a user's process needs exactly that import.

The streams run in this process here (DataLoader workers are what each worker's
``iter_worker`` runs; tests/test_data.py runs real worker processes on S3): a forked worker
reading S3 crashed or hung now and then when this module ran after the in-process training
tests in one pytest session, which a data-format test should not depend on.
"""

from __future__ import annotations

import importlib
import io
import itertools
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from adpm_dist.io import data, shard_reader, shards, storage
from adpm_dist.io.quality import DataSummary
from tests.s3_server import subprocess_env
from tests.tool_modules import load_tool

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(180)
make_shards = load_tool("make_shards")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.rint(d.images * 255 / 16).astype(np.uint8), d.target


def _as_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> the documented [-1, 1] convention, computed here independently."""
    return torch.tensor(img, dtype=torch.float64).permute(2, 0, 1).float() / 127.5 - 1


# ---------------------------------------------------------------- ours written, webdataset reads


def test_plain_webdataset_reads_what_make_shards_wrote(s3_bucket: str):
    out = f"{s3_bucket}/digits"
    manifest = make_shards.main(["digits", out, "--limit", "90", "--shard-size", "25",
                                 "--test-fraction", "0.2"])
    images, labels = _digits()
    train_idx, test_idx = make_shards.split_indices(90, 0.2, 0)
    # webdataset 1.0.2 has no s3:// opener of its own: every s3:// read below goes through ours.
    assert importlib.import_module("webdataset.gopen").gopen_schemes["s3"] is shard_reader._gopen_storage
    for split, idx in (("train", train_idx), ("test", test_idx)):
        n_shards = manifest["splits"][split]["num_shards"]
        pattern = f"{out}/{split}-{{000000..{n_shards - 1:06d}}}.tar"  # one brace URL, as users write it
        raw = list(wds.WebDataset(pattern, shardshuffle=False))
        decoded = list(wds.WebDataset(pattern, shardshuffle=False).decode("pil"))
        assert len(raw) == len(decoded) == manifest["splits"][split]["total"] == len(idx)
        assert [s["__key__"] for s in raw] == [f"{split}_{i:08d}" for i in range(len(idx))]
        for i, (r, d) in enumerate(zip(raw, decoded)):
            source = images[idx[i]]
            with Image.open(io.BytesIO(r["png"])) as img:
                np.testing.assert_array_equal(np.asarray(img), source)
            rgb = np.repeat(source[..., None], 3, axis=2)  # decode("pil") gives RGB images
            np.testing.assert_array_equal(np.asarray(d["png"]), rgb)
            assert int(r["cls"]) == d["cls"] == labels[idx[i]]


def test_s3_urls_in_a_users_process_need_only_our_import(s3_server, s3_bucket: str):
    """A fresh process: webdataset alone has no s3:// opener; after `import adpm_dist.io.data`
    a plain WebDataset("s3://…") reads through our storage layer."""
    out = f"{s3_bucket}/digits"
    make_shards.main(["digits", out, "--limit", "30", "--shard-size", "10", "--test-fraction", "0"])
    pattern = f"{out}/train-{{000000..000002}}.tar"
    script = ("import sys, webdataset as wds\n"
              "if sys.argv[2] == 'ours': import adpm_dist.io.data\n"
              "try:\n"
              "    print(sum(1 for _ in wds.WebDataset(sys.argv[1], shardshuffle=False)))\n"
              "except Exception as exc:\n"
              "    print('failed:', exc)\n")
    env = subprocess_env(s3_server, PYTHONPATH=str(ROOT))
    runs = {how: subprocess.run([sys.executable, "-c", script, pattern, how], env=env, cwd=str(ROOT),
                                capture_output=True, text=True, timeout=120)
            for how in ("plain", "ours")}
    assert runs["plain"].stdout.startswith("failed:") and "no gopen handler" in runs["plain"].stdout
    assert runs["ours"].returncode == 0 and runs["ours"].stdout.strip() == "30", runs["ours"].stderr


# ---------------------------------------------------------------- webdataset written, ours reads

N_PLAIN = 23
PER_SHARD = 7  # shards of 7, 7, 7, 2


def _rgb_images(n: int, size: int = 8, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def plain_shards(s3_bucket: str) -> tuple[str, list[np.ndarray]]:
    """23 RGB samples written by webdataset.ShardWriter (to s3:// through our opener), fields
    given in a different order per sample (TarWriter stores them sorted: .cls, .json, .png)."""
    images = _rgb_images(N_PLAIN)
    orders = list(itertools.permutations(("png", "cls", "json")))
    with wds.ShardWriter(f"{s3_bucket}/plain/shard-%06d.tar", maxcount=PER_SHARD, verbose=0) as sink:
        for i, arr in enumerate(images):
            fields = {"png": _png(arr), "cls": str(i % 10), "json": json.dumps({"i": i, "note": "x" * i})}
            sink.write({"__key__": f"s{i:04d}", **{k: fields[k] for k in orders[i % len(orders)]}})
    return f"{s3_bucket}/plain", images


def test_our_streams_read_webdataset_shardwriter_shards(plain_shards):
    folder, images = plain_shards
    pattern = f"{folder}/shard-{{000000..000003}}.tar"
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(f"{folder}/shard-000000.tar"))) as tar:
        assert [m.name for m in tar.getmembers()[:3]] == ["s0000.cls", "s0000.json", "s0000.png"]
    # Training needs no manifest: the format comes from the first image.
    written = {_as_tensor(a).numpy().tobytes() for a in images}
    stream = data.TrainStream(pattern, batch_size=5, seed=0, rank=0, world_size=1, batches_per_epoch=12,
                              num_workers=0, shuffle_buffer=10)
    seen = set()
    for batch in stream.epoch(0):
        assert batch.shape == (5, 3, 8, 8)
        seen |= {x.numpy().tobytes() for x in batch}
    assert seen <= written and len(seen) >= N_PLAIN // 2  # 60 draws over 23 written images
    assert stream.summary.bad_total == 0
    # Evaluation needs the manifest (counts and ids): the error names it and says how to make one.
    with pytest.raises(FileNotFoundError, match=r"plain/manifest\.json not found.*index_shards"):
        data.eval_batches(pattern, batch_size=4, rank=0, world_size=1)
    urls = shards.expand_urls(pattern)
    manifest = shard_reader.index_shards(urls, "train")
    assert [e["count"] for e in manifest["shards"]] == [7, 7, 7, 2]
    assert (manifest["resolution"], manifest["channels"], manifest["total"]) == (8, 3, N_PLAIN)
    shards.write_manifest(folder, manifest)
    _assert_eval_exactly_once(pattern, [_as_tensor(a) for a in images])


def _assert_eval_exactly_once(pattern: str, expected: list[torch.Tensor], world: int = 2, workers: int = 2):
    """Every id once across ranks × workers, each with its image."""
    seen: list[int] = []
    summary = DataSummary()
    for rank in range(world):
        ev = data.eval_batches(pattern, batch_size=4, rank=rank, world_size=world, num_workers=0)
        parts = [ev.dataset.iter_worker(w, workers) for w in range(workers)]
        for ids, batch, delta in itertools.chain(*parts):
            summary.merge(delta)
            for i, x in zip(ids.tolist(), batch):
                assert torch.equal(x, expected[i]), i
            seen.extend(ids.tolist())
    assert sorted(seen) == list(range(len(expected)))
    assert summary.good == len(expected) and summary.bad_total == 0, summary.report()


def _tar_any_order(samples: list[list[tuple[str, bytes]]]) -> bytes:
    """A tar written with plain tarfile, members in exactly the order given (other tools do)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for members in samples:
            for name, blob in members:
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def test_members_in_any_order_extra_fields_and_jpeg(s3_bucket: str):
    """Image first or last, unknown fields, an upper-case extension, a .jpg image, keys in a
    sub-folder: grouped per key by webdataset, read by both our streams."""
    images = _rgb_images(12, seed=1)
    samples, expected = [], []
    for i, arr in enumerate(images):
        key = f"part/k{i:03d}"
        if i == 5:  # JPEG is lossy: what our streams must give is what PIL decodes from the bytes
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            image = (f"{key}.jpg", buf.getvalue())
            with Image.open(io.BytesIO(buf.getvalue())) as img:
                arr = np.asarray(img.convert("RGB"))
        else:
            image = (f"{key}.{'PNG' if i == 7 else 'png'}", _png(arr))
        others = [(f"{key}.cls", str(i).encode()), (f"{key}.json", b'{"a": 1}'), (f"{key}.txt", b"x")]
        members = others[: i % 4] + [image] + others[i % 4 :]
        samples.append(members)
        expected.append(_as_tensor(arr))
    folder = f"{s3_bucket}/mixed"
    storage.write_bytes(f"{folder}/mixed-000000.tar", _tar_any_order(samples[:6]))
    storage.write_bytes(f"{folder}/mixed-000001.tar", _tar_any_order(samples[6:]))
    urls = shards.expand_urls(f"{folder}/mixed-*.tar")
    keys = [s["__key__"] for u in urls for s in data._iter_tar_groups(u)]
    assert keys == [f"part/k{i:03d}" for i in range(12)]
    shards.write_manifest(folder, shard_reader.index_shards(urls, "test"))
    _assert_eval_exactly_once(f"{folder}/mixed-*.tar", expected, world=3, workers=1)
    stream = data.TrainStream(f"{folder}/mixed-*.tar", batch_size=4, seed=1, rank=0, world_size=1,
                              batches_per_epoch=6, num_workers=0, shuffle_buffer=6)
    allowed = {x.numpy().tobytes() for x in expected}
    assert all(x.numpy().tobytes() in allowed for b in stream.epoch(0) for x in b)
    assert stream.summary.bad_total == 0
