"""``evaluate fid``: FID of a sample folder (or shard URLs) against reference shards.

Before any feature is computed, the samples are checked against their folder's
``manifest.json`` (:func:`verify_samples`): every shard's sha256, size and image count,
and for ``adpm_dist.sample`` output also that ``job.json`` and the manifest name the same
job and every image carries that job's seed (seed + index). A folder changed or mixed
after its job wrote it is refused with one line naming the file (exit 2), never scored.

Inception statistics of the reference set are cached beside its manifest
(``fid-stats-<key>.npz``, key = shard list + manifest + network digest). With ``--out``,
a rerun over the same finished sample folder is a no-op.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time

import numpy as np
import torch

from adpm_dist.errors import UserError
from adpm_dist.io import dist, storage
from adpm_dist.io.shards import MANIFEST_NAME
from adpm_dist.stages.config_args import resolved_config
from adpm_dist.stages.job import Progress, together

SAMPLE_JOB_NAME = "job.json"  # written by adpm_dist.sample beside its manifest


class SampleFolderError(UserError, ValueError):
    """A sample folder does not match its own manifest or job description."""


# ---------------------------------------------------------------------------- verification


def _read_json(url: str) -> dict:
    return storage.read_json_object(url, SampleFolderError)


def _members(data: bytes) -> tuple[int, list[dict]]:
    """(number of images, the per-image JSON records) of one tar shard."""
    images, metas = 0, []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            images += member.name.endswith(".png")
            if member.name.endswith(".json"):
                meta = json.loads(tar.extractfile(member).read())
                metas.append(meta if isinstance(meta, dict) else {})
    return images, metas


def _check_shard(url: str, entry: dict, job: dict | None, manifest_url: str) -> None:
    """sha256, bytes and image count as the manifest says; with a job, each image's seed."""
    data = storage.read_bytes(url)
    name, manifest = storage.redact(url), storage.redact(manifest_url)
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise SampleFolderError(f"{name}: sha256 differs from {manifest}'s (the shard was changed or "
                                "replaced after the manifest was written)")
    if entry.get("bytes") is not None and len(data) != int(entry["bytes"]):
        raise SampleFolderError(f"{name}: {len(data)} bytes, {manifest} says {entry['bytes']}")
    try:
        images, metas = _members(data)
    except (tarfile.TarError, ValueError) as exc:
        raise SampleFolderError(f"{name}: unreadable shard ({type(exc).__name__}: {exc})") from None
    if images != int(entry["count"]):
        raise SampleFolderError(f"{name}: {images} images, {manifest} says {entry['count']}")
    if job is None:
        return
    lo, hi = int(entry["offset"]), int(entry["offset"]) + int(entry["count"])
    for meta in metas:
        index, seed = meta.get("index"), meta.get("seed")
        if not isinstance(index, int) or not lo <= index < hi or seed != job["seed"] + index:
            raise SampleFolderError(f"{name}: an image (index {index}, seed {seed}) was not drawn by the "
                                    f"job in {SAMPLE_JOB_NAME} (seed {job['seed']} + index, indices "
                                    f"{lo}..{hi - 1})")


def verify_samples(urls: list[str]) -> None:
    """Refuse sample shards that do not match their folder's manifest and job (see module doc).

    Shards in a folder without a manifest are left to the data loader (which refuses them).
    """
    folders: dict[str, list[str]] = {}
    for url in urls:
        folders.setdefault(storage.dirname(url), []).append(url)
    for folder, members in folders.items():
        manifest_url = storage.join(folder, MANIFEST_NAME)
        if not storage.exists(manifest_url):
            continue
        manifest = _read_json(manifest_url)
        entries = {e.get("name"): e for e in manifest.get("shards", []) if isinstance(e, dict)}
        job_url = storage.join(folder, SAMPLE_JOB_NAME)
        job = _read_json(job_url) if storage.exists(job_url) else None
        if job is not None:
            if manifest.get("job") != job:
                mjob = manifest.get("job") or {}
                keys = [k for k in sorted(set(job) | set(mjob)) if job.get(k) != mjob.get(k)]
                raise SampleFolderError(f"{storage.redact(job_url)} and {storage.redact(manifest_url)} name "
                                        f"different jobs (differ in {', '.join(keys)}): a mixed folder")
            missing = sorted(set(entries) - {storage.basename(u) for u in members})
            if missing:
                raise SampleFolderError(f"{storage.redact(folder)}: shard(s) {', '.join(missing[:3])} "
                                        f"listed in {MANIFEST_NAME} are missing")
        for url in members:
            entry = entries.get(storage.basename(url))
            if entry is None:
                raise SampleFolderError(f"{storage.redact(url)} is not listed in "
                                        f"{storage.redact(manifest_url)}")
            _check_shard(url, entry, job, manifest_url)


# ---------------------------------------------------------------------------- FID


def _features_over(urls, extractor, rank: int, world: int, batch_size: int, num_workers: int,
                   progress_label: str, show: bool):
    """FeatureStats of every image of ``urls`` (each once across ranks), all-reduced."""
    from adpm_dist.io.data import eval_batches
    from adpm_dist.models.fid import FeatureStats

    stream = eval_batches(urls, batch_size=batch_size, rank=rank, world_size=world, num_workers=num_workers)
    stats = FeatureStats.empty()
    with Progress(show, progress_label, stream.total // max(world, 1)) as progress:
        for _ids, x in stream:
            stats.add(extractor(x))
            progress.update(stats.count)
    packed = torch.tensor(np.concatenate([[stats.count], stats.sum, stats.outer.reshape(-1)]))
    packed = dist.all_reduce_sum(packed).numpy()
    d = stats.sum.shape[0]
    return FeatureStats(packed[1:1 + d], packed[1 + d:].reshape(d, d), int(round(packed[0])))


def reference_cache_url(urls: list[str], manifest_sha: str, net_digest: str) -> str:
    key = hashlib.sha256(json.dumps([sorted(storage.basename(u) for u in urls), manifest_sha,
                                     net_digest]).encode()).hexdigest()[:16]
    return storage.join(storage.dirname(urls[0]), f"fid-stats-{key}.npz")


def _manifest_sha(urls: list[str]) -> str:
    """sha256 of the manifest beside the first shard ("" when there is none)."""
    manifest = storage.join(storage.dirname(urls[0]), MANIFEST_NAME)
    return hashlib.sha256(storage.read_bytes(manifest)).hexdigest() if storage.exists(manifest) else ""


def _fid_already_done(out: str | None, samples_sha: str, cache: str, net_digest: str) -> bool:
    """True when ``out`` holds the FID of these very samples against these statistics.

    Only a finished sample folder (one with a manifest) can be recognised; shard lists
    without one are always evaluated afresh.
    """
    if not out or not samples_sha or not storage.exists(out):
        return False
    try:
        done = json.loads(storage.read_text(out))
    except json.JSONDecodeError:
        return False  # a torn or foreign file: recompute and overwrite it atomically
    return (done.get("samples_manifest_sha256") == samples_sha
            and done.get("reference_stats") == storage.redact(cache)
            and done.get("network_sha256") == net_digest)


def _reference_stats(args, ref_urls, cache, extractor, rank, world, show):
    """(μ, Σ, count, cached?) of the reference set: from the cache, or computed and cached."""
    from adpm_dist.models.fid import load_stats_npz

    if storage.exists(cache):
        mu, sig, n_ref = load_stats_npz(storage.read_bytes(cache), cache)
        return mu, sig, n_ref, True
    ref = _features_over(ref_urls, extractor, rank, world, args.batch_size, args.num_workers,
                         "FID reference", show)
    together(lambda: storage.write_bytes(cache, ref.to_npz()), rank0_only=True)
    mu, sig = ref.mean_cov()
    return mu, sig, ref.count, False


def run_fid(args) -> int:
    from adpm_dist.io.shards import expand_urls
    from adpm_dist.models.fid import InceptionFeatures, frechet_distance

    info = dist.init()
    rank, world = info.rank, info.world_size
    samples = args.samples
    if not samples.endswith(".tar") and "*" not in samples and "{" not in samples:
        samples = storage.join(samples, "samples-*.tar")
    ref_urls = expand_urls(args.reference)
    extractor = InceptionFeatures(dist.device_for(info), batch_size=args.batch_size)
    cache = reference_cache_url(ref_urls, _manifest_sha(ref_urls), extractor.digest)
    sample_urls = expand_urls(samples)
    together(lambda: verify_samples(sample_urls), rank0_only=True)
    samples_sha = _manifest_sha(sample_urls)
    if _fid_already_done(args.out, samples_sha, cache, extractor.digest):
        if rank == 0:
            print(f"{storage.redact(args.out)}: already complete, nothing to do")
        dist.shutdown()
        return 0
    start, show = time.time(), not args.no_progress
    mu_r, sig_r, n_ref, cached = _reference_stats(args, ref_urls, cache, extractor, rank, world, show)
    gen = _features_over(sample_urls, extractor, rank, world, args.batch_size, args.num_workers,
                         "FID samples", show)
    mu_s, sig_s = gen.mean_cov()
    result = {"fid": frechet_distance(mu_s, sig_s, mu_r, sig_r), "num_samples": gen.count,
              "num_reference": n_ref, "samples": storage.redact(args.samples),
              "reference": storage.redact(args.reference), "reference_stats": storage.redact(cache),
              "reference_stats_cached": cached, "network_sha256": extractor.digest,
              "samples_manifest_sha256": samples_sha, "wall_time_s": round(time.time() - start, 3),
              "config": resolved_config(args)}

    def write() -> None:
        if args.out:
            storage.write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))

    together(write, rank0_only=True)
    dist.shutdown()
    return 0
