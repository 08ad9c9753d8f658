"""``evaluate fid``: FID of a sample folder (or shard URLs) against reference shards.

Before any feature is computed, the samples are checked against their folder's
``manifest.json`` (:func:`verify_samples`): every shard's sha256, size and image count,
and for ``adpm_dist.sample`` output also that ``job.json`` and the manifest name the same
job and every image carries that job's seed (seed + index). A folder changed or mixed
after its job wrote it is refused with one line naming the file (exit 2), never scored.

Inception statistics of the reference set are cached beside its manifest
(``fid-stats-<key>.npz``, key = shard list + manifest + network digest, + the numeric mode
when it is not fp32). With ``--out``, a rerun over the same finished sample folder is a no-op.

The stage runs on the job core (:mod:`adpm_dist.stages.job`), like ``estimate``, ``sample``
and ``evaluate nll``: rank 0 alone verifies the samples and decides whether the result is
already done and whether the reference statistics are cached, and every rank learns both
decisions; the features are extracted in rounds of one batch per rank (any rank's failure
ends every rank within a round); each round's :meth:`FidJob.reduce` sums the images done
and, once every rank's share is done, all-reduces the per-rank feature sums (once; nothing
is gathered), and rank 0 writes the cache and the result.
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
from adpm_dist.io import collective, dist, storage
from adpm_dist.io.shards import MANIFEST_NAME
from adpm_dist.models.loading import numeric_mode
from adpm_dist.stages.config_args import resolved_config
from adpm_dist.stages.job import ShardedJob, run_job, together

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


def reference_cache_url(urls: list[str], manifest_sha: str, net_digest: str, precision: str = "fp32") -> str:
    """``fid-stats-<key>.npz`` beside the reference shards; fp32's key is the one of every
    earlier version (the mode joins the key only when it is another one)."""
    parts = [sorted(storage.basename(u) for u in urls), manifest_sha, net_digest]
    if precision != "fp32":
        parts.append(precision)
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    return storage.join(storage.dirname(urls[0]), f"fid-stats-{key}.npz")


def _manifest_sha(urls: list[str]) -> str:
    """sha256 of the manifest beside the first shard ("" when there is none)."""
    manifest = storage.join(storage.dirname(urls[0]), MANIFEST_NAME)
    return hashlib.sha256(storage.read_bytes(manifest)).hexdigest() if storage.exists(manifest) else ""


def _fid_already_done(out: str | None, samples_sha: str, cache: str, net_digest: str, mode: str) -> bool:
    """True when ``out`` holds the FID of these very samples against these statistics, in this mode.

    Only a finished sample folder (one with a manifest) can be recognised; shard lists
    without one are always evaluated afresh. A result without ``numeric_mode`` is fp32's.
    """
    if not out or not samples_sha or not storage.exists(out):
        return False
    try:
        done = json.loads(storage.read_text(out))
    except json.JSONDecodeError:
        return False  # a torn or foreign file: recompute and overwrite it atomically
    if not isinstance(done, dict):
        return False
    recorded = (done.get("numeric_mode") or {}).get("precision", "fp32")
    return (done.get("samples_manifest_sha256") == samples_sha
            and done.get("reference_stats") == storage.redact(cache)
            and done.get("network_sha256") == net_digest and recorded == mode)


def _pack(stats) -> np.ndarray:
    return np.concatenate([[stats.count], stats.sum, stats.outer.reshape(-1)])


def _unpack(packed: np.ndarray, dim: int):
    from adpm_dist.models.fid import FeatureStats

    return FeatureStats(packed[1:1 + dim], packed[1 + dim:].reshape(dim, dim), int(round(packed[0])))


class FidJob(ShardedJob):
    """FID on the job core: rounds of one batch per rank over the reference shards (unless their
    statistics are cached) and then the sample shards; every image once across ranks."""

    label = "FID features (images)"

    def __init__(self, args, rank: int, world: int):
        from adpm_dist.io.shards import expand_urls
        from adpm_dist.models.fid import InceptionFeatures

        self.args, self.rank, self.world, self.start_time = args, rank, world, time.time()
        samples = args.samples
        if not samples.endswith(".tar") and "*" not in samples and "{" not in samples:
            samples = storage.join(samples, "samples-*.tar")
        self.ref_urls, self.sample_urls = expand_urls(args.reference), expand_urls(samples)
        self.device = dist.device_for(dist.env_info())
        self.extractor = InceptionFeatures(self.device, batch_size=args.batch_size, precision=args.precision)
        self.mode = numeric_mode(self.extractor.precision, self.device)
        self.show_progress = not args.no_progress
        self.plan: dict = {}
        self.sets: list = []  # [name, batch iterator, FeatureStats]
        self.current = self.images = 0
        self.totals: np.ndarray | None = None
        self.reference = None  # rank 0: (μ, Σ, count) read from the cache

    def decide(self) -> dict:
        """Rank 0: verify the samples; is the result done, are the reference statistics cached?"""
        from adpm_dist.models.fid import load_stats_npz

        verify_samples(self.sample_urls)
        self.samples_sha = _manifest_sha(self.sample_urls)
        digest, precision = self.extractor.digest, self.extractor.precision
        self.cache = reference_cache_url(self.ref_urls, _manifest_sha(self.ref_urls), digest, precision)
        if _fid_already_done(self.args.out, self.samples_sha, self.cache, digest, precision):
            return {"done": True, "cached": True}
        if storage.exists(self.cache):
            self.reference = load_stats_npz(storage.read_bytes(self.cache), self.cache)
        return {"done": False, "cached": self.reference is not None}

    def open(self, plan: dict) -> None:
        """Every rank: the batch streams the plan needs (this rank's share of each set)."""
        from adpm_dist.io.data import eval_batches
        from adpm_dist.models.fid import FeatureStats

        self.plan = plan
        if plan["done"]:
            return
        names = ["samples"] if plan["cached"] else ["reference", "samples"]
        for name in names:
            urls = self.ref_urls if name == "reference" else self.sample_urls
            stream = eval_batches(urls, batch_size=self.args.batch_size, rank=self.rank,
                                  world_size=self.world, num_workers=self.args.num_workers)
            self.progress_total += stream.total
            self.sets.append([name, iter(stream), FeatureStats.empty()])

    def existing(self) -> bool:
        return bool(self.plan["done"])

    def done_message(self) -> str:
        return f"{storage.redact(self.args.out)}: already complete, nothing to do"

    def step(self, round_index: int) -> bool:
        """One batch of this rank's share through the network; True while any is left."""
        while self.current < len(self.sets):
            _, batches, stats = self.sets[self.current]
            batch = next(batches, None)
            if batch is not None:
                stats.add(self.extractor(batch[1]))
                self.images += len(batch[1])
                return True
            self.current += 1
        return False

    def reduce(self, rounds: int) -> tuple[int, bool]:
        """(images done on every rank, all done?); in the round where every rank's share is done,
        also the one all-reduce of every rank's Σf, Σffᵀ, n (the job core runs it in its protocol)."""
        done = self.current >= len(self.sets)
        counts = dist.all_reduce_sum(torch.tensor([float(self.images), float(done)], dtype=torch.float64))
        finished = int(counts[1]) == self.world
        if finished and self.totals is None:
            packed = torch.from_numpy(np.concatenate([_pack(stats) for _, _, stats in self.sets]))
            self.totals = dist.all_reduce_sum(packed).numpy()
        return int(counts[0]), finished

    def payload(self):
        return None  # the sums were all-reduced in the last round (reduce): nothing to gather

    def write(self, gathered: list) -> None:
        from adpm_dist.models.fid import frechet_distance

        dim = self.sets[0][2].sum.shape[0]
        size = 1 + dim + dim * dim
        stats = {name: _unpack(self.totals[i * size:(i + 1) * size], dim)
                 for i, (name, _, _) in enumerate(self.sets)}
        if "reference" in stats:
            ref = stats["reference"]
            storage.write_bytes(self.cache, ref.to_npz())
            mu_r, sig_r = ref.mean_cov()
            n_ref = ref.count
        else:
            mu_r, sig_r, n_ref = self.reference
        gen = stats["samples"]
        mu_s, sig_s = gen.mean_cov()
        args = self.args
        result = {"fid": frechet_distance(mu_s, sig_s, mu_r, sig_r), "num_samples": gen.count,
                  "num_reference": n_ref, "samples": storage.redact(args.samples),
                  "reference": storage.redact(args.reference), "reference_stats": storage.redact(self.cache),
                  "reference_stats_cached": "reference" not in stats,
                  "network_sha256": self.extractor.digest, "samples_manifest_sha256": self.samples_sha,
                  "numeric_mode": self.mode, "wall_time_s": round(time.time() - self.start_time, 3),
                  "config": resolved_config(args)}
        if args.out:
            storage.write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))


def run_fid(args) -> int:
    """``evaluate fid`` on every rank: the job (one phase), rank 0's plan shared with every rank,
    each rank's streams opened (one phase), then :func:`run_job`."""
    info = dist.init()
    timeout = getattr(args, "collective_timeout", None)
    collective.start(timeout)  # the watchdog, before the first phase (as job_main does)
    job = together(lambda: FidJob(args, info.rank, info.world_size))
    plan = together(job.decide, rank0_only=True, share=True)
    together(lambda: job.open(plan))
    return run_job(job, timeout)
