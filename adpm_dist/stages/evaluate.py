"""Evaluation tables: ``python -m adpm_dist.evaluate nll|fid …`` (one process or under torchrun).

NLL (negative ELBO in bits/dim, the paper's Table 1)::

    python -m adpm_dist.evaluate nll --checkpoint RUN --gamma G.json --data TEST_URLS \
        --steps 10,25,50,100,200,1000 --methods ddpm-tilde,ddpm-beta,analytic-ddpm \
        --trajectory even,optimal --out results/nll

Every test image is read once (split over ranks by :func:`data.eval_batches`)
and evaluated under every (trajectory, K, method) in the same pass. The noise
of image i comes from a generator seeded by (seed, i) afresh for every
configuration: results do not depend on world size or batch size, and all
configurations see the same noise (common random numbers make their
differences more precise than their standard errors suggest). Ranks flush
partial sums every ``--flush-every`` batches, so an interrupted run resumes;
a finished one is a no-op. Writes ``OUT/nll.json`` and ``OUT/nll.md``.

FID::

    python -m adpm_dist.evaluate fid --samples SAMPLES_DIR --reference TEST_URLS [--out fid.json]

Inception statistics of the reference set are cached beside its manifest
(``fid-stats-<key>.npz``, key = shard list + manifest + network digest). With
``--out``, a rerun over the same finished sample folder is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from itertools import islice

import numpy as np
import torch

from adpm_dist.diffusion.analytic import ANALYTIC_METHODS, DDPM_FAMILY
from adpm_dist.diffusion.likelihood import negative_elbos
from adpm_dist.diffusion.samplers import make_generators
from adpm_dist.diffusion.trajectory import TRAJECTORIES
from adpm_dist.gamma import GammaFileError
from adpm_dist.io import dist, storage
from adpm_dist.models.loading import PRECISIONS, CheckpointError, eps_function, load_checkpoint
from adpm_dist.stages.sample import load_gamma_for, resolve_trajectory

# ============================================================================ NLL


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def image_seed(seed: int, image_id: int) -> int:
    """Seed of image ``image_id``'s noise: a hash, so nearby (seed, id) pairs share nothing."""
    digest = hashlib.blake2b(f"nll:{seed}:{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def config_key(trajectory: str, steps: int, method: str) -> str:
    return f"{trajectory}/K={steps}/{method}"


class NllState:
    """Per-configuration sums on one rank (bits/dim and the nats of each ELBO term)."""

    FIELDS = ("bpd", "bpd_sq", "prior", "steps", "decoder")

    def __init__(self, keys: list[str], fingerprint: dict):
        self.fingerprint = fingerprint
        self.units_done = 0
        self.count = 0
        self.sums = {k: dict.fromkeys(self.FIELDS, 0.0) for k in keys}
        self.per_image: dict[str, dict[str, float]] = {}  # id → {key: bpd}, only with --per-image

    def add(self, key: str, ids: list[int], out: dict, keep_per_image: bool) -> None:
        bpd = out["bpd"].to(torch.float64)
        s = self.sums[key]
        s["bpd"] += float(bpd.sum())
        s["bpd_sq"] += float((bpd * bpd).sum())
        s["prior"] += float(out["prior"].sum())
        s["steps"] += float(out["steps"].sum())
        s["decoder"] += float(out["decoder"].sum())
        if keep_per_image:
            for i, v in zip(ids, bpd.tolist()):
                self.per_image.setdefault(str(i), {})[key] = v

    def to_json(self) -> str:
        return json.dumps({"fingerprint": self.fingerprint, "units_done": self.units_done,
                           "count": self.count, "sums": self.sums, "per_image": self.per_image})

    @classmethod
    def from_json(cls, text: str, source: str) -> NllState:
        try:
            obj = json.loads(text)
            st = cls(list(obj["sums"]), obj["fingerprint"])
            st.units_done, st.count = int(obj["units_done"]), int(obj["count"])
            st.sums, st.per_image = obj["sums"], obj["per_image"]
            return st
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{source}: unreadable partial state ({exc}); delete it to start over") from None


def nll_table(results: dict, trajectories: list[str], steps: list[int], methods: list[str]) -> str:
    """Markdown: one row per (trajectory, method), one column per K, "bpd ± se"."""
    head = "| trajectory | method | " + " | ".join(f"K={k}" for k in steps) + " |"
    rule = "|---|---|" + "---|" * len(steps)
    rows = [head, rule]
    for traj in trajectories:
        for method in methods:
            cells = []
            for k in steps:
                r = results[config_key(traj, k, method)]
                cells.append(f"{r['bpd']:.3f} ± {r['bpd_stderr']:.3f}")
            rows.append(f"| {traj} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _partial_url(out: str, rank: int, world: int) -> str:
    return storage.join(out, "nll.partial", f"rank-{rank:05d}-of-{world:05d}.json")


def run_nll(args) -> int:
    steps = [int(k) for k in _csv(args.steps)]
    methods, trajectories = _csv(args.methods), _csv(args.trajectory)
    for m in methods:
        if m not in DDPM_FAMILY:
            raise ValueError(f"--methods: the ELBO is defined for {list(DDPM_FAMILY)}, not {m!r}")
    for t in trajectories:
        if t not in TRAJECTORIES:
            raise ValueError(f"--trajectory: unknown {t!r}; choose from {list(TRAJECTORIES)}")
    loaded = load_checkpoint(args.checkpoint)
    if args.gamma is None and (set(methods) & set(ANALYTIC_METHODS) or "optimal" in trajectories):
        raise ValueError("analytic methods and the optimal trajectory need --gamma (a Γ file)")
    gamma, gamma_digest = load_gamma_for(args.gamma, loaded)
    taus = {(t, k): resolve_trajectory(t, loaded, k, gamma) for t in trajectories for k in steps}
    keys = [config_key(t, k, m) for t in trajectories for k in steps for m in methods]
    fingerprint = {
        "model": loaded.digest, "gamma_sha256": gamma_digest, "data": storage.redact(json.dumps(args.data)),
        "seed": args.seed, "keys": keys, "precision": args.precision, "per_image": args.per_image,
        "batch_size": args.batch_size, "num_workers": args.num_workers, "limit": args.limit,
    }
    info = dist.init()
    rank, world = info.rank, info.world_size
    out_json = storage.join(args.out, "nll.json")
    if storage.exists(out_json):
        done = json.loads(storage.read_text(out_json))
        if {k: v for k, v in done.get("fingerprint", {}).items()} == fingerprint:
            if rank == 0:
                print(f"{storage.redact(out_json)}: already complete, nothing to do")
            dist.shutdown()
            return 0
        raise ValueError(f"{out_json} exists and holds a different evaluation; choose another --out")
    fingerprint_rank = {**fingerprint, "world_size": world}
    partial = _partial_url(args.out, rank, world)
    state = NllState(keys, fingerprint_rank)
    if storage.exists(partial):
        state = NllState.from_json(storage.read_text(partial), partial)
        if state.fingerprint != fingerprint_rank:
            raise ValueError(f"{partial} was written by a different command; rerun it unchanged or delete it")

    from adpm_dist.io.data import eval_batches

    device = dist.device_for(info)
    eps_fn = eps_function(loaded.model, device, args.precision)
    stream = eval_batches(args.data, batch_size=args.batch_size, rank=rank, world_size=world,
                          num_workers=args.num_workers)
    # --limit keeps the images with id < LIMIT: the same subset for any world size.
    total = stream.total if args.limit is None else min(stream.total, args.limit)
    batches = islice(stream, state.units_done, None)
    progress = _Progress(rank == 0 and not args.no_progress, total, "NLL (test images)")
    start = time.time()
    while True:
        n_local = 0
        for ids, x in islice(batches, args.flush_every):
            ids_list = [int(i) for i in ids]
            if args.limit is not None:
                keep = [j for j, i in enumerate(ids_list) if i < args.limit]
                ids_list, x = [ids_list[j] for j in keep], x[keep]
            x0 = x.to(device)
            for (traj, k), tau in taus.items() if ids_list else ():
                # One pass of K ε evaluations serves every method (they differ only in σ²).
                gens = make_generators([image_seed(args.seed, i) for i in ids_list], device=device)
                outs = negative_elbos(eps_fn, loaded.schedule, tau, methods, x0, gens, gamma=gamma)
                for method in methods:
                    state.add(config_key(traj, k, method), ids_list, outs[method], args.per_image)
            state.units_done += 1
            state.count += len(ids_list)
            n_local += 1
        storage.write_text(partial, state.to_json())
        flags = dist.all_reduce_sum(torch.tensor([float(state.count), float(n_local == args.flush_every)],
                                                 dtype=torch.float64))
        if progress:
            progress.update(int(flags[0]))
        if flags[1] == 0:
            break
    wall = time.time() - start
    if progress:
        progress.close()

    gathered = dist.all_gather_object({"count": state.count, "sums": state.sums,
                                       "per_image": state.per_image})
    if rank == 0:
        count = sum(g["count"] for g in gathered)
        if count != total:
            raise RuntimeError(f"evaluated {count} images but the data holds {total}")
        results = {}
        for key in keys:
            s = {f: sum(g["sums"][key][f] for g in gathered) for f in NllState.FIELDS}
            mean = s["bpd"] / count
            var = max(s["bpd_sq"] / count - mean**2, 0.0) * count / max(count - 1, 1)
            results[key] = {"bpd": mean, "bpd_stderr": math.sqrt(var / count), "count": count,
                            "prior_nats": s["prior"] / count, "steps_nats": s["steps"] / count,
                            "decoder_nats": s["decoder"] / count}
        per_image = {}
        for g in gathered:
            per_image.update(g["per_image"])
        doc = {"format": "adpm-nll/1", "fingerprint": fingerprint, "model": loaded.describe(),
               "schedule": loaded.schedule.describe(), "gamma_sha256": gamma_digest,
               "trajectories": {f"{t}/K={k}": [int(v) for v in tau] for (t, k), tau in taus.items()},
               "results": results, "num_images": count, "wall_time_s": wall, "world_size": world}
        if args.per_image:
            doc["per_image_bpd"] = dict(sorted(per_image.items(), key=lambda kv: int(kv[0])))
        table = nll_table(results, trajectories, steps, methods)
        storage.write_text(storage.join(args.out, "nll.md"),
                           f"Negative ELBO, bits/dim (± standard error over {count} images)\n\n{table}")
        storage.write_text(out_json, json.dumps(doc, indent=1))
        print(table)
    dist.barrier()
    storage.remove(partial)
    dist.barrier()
    if rank == 0:
        storage.remove(storage.join(args.out, "nll.partial"), recursive=True)
    dist.shutdown()
    return 0


# ============================================================================ FID


def _features_over(urls, extractor, rank: int, world: int, batch_size: int, num_workers: int,
                   progress_label: str, show: bool):
    """FeatureStats of every image of ``urls`` (each once across ranks), all-reduced."""
    from adpm_dist.io.data import eval_batches
    from adpm_dist.stages.fid import FeatureStats

    stream = eval_batches(urls, batch_size=batch_size, rank=rank, world_size=world, num_workers=num_workers)
    stats = FeatureStats.empty()
    progress = _Progress(show, stream.total // max(world, 1), progress_label)
    for _ids, x in stream:
        stats.add(extractor(x))
        if progress:
            progress.update(stats.count)
    if progress:
        progress.close()
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
    from adpm_dist.io.shards import MANIFEST_NAME

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


def run_fid(args) -> int:
    from adpm_dist.io.shards import expand_urls
    from adpm_dist.stages.fid import InceptionFeatures, frechet_distance, load_stats_npz

    info = dist.init()
    rank, world = info.rank, info.world_size
    device = dist.device_for(info)
    samples = args.samples
    if not samples.endswith(".tar") and "*" not in samples and "{" not in samples:
        samples = storage.join(samples, "samples-*.tar")
    ref_urls = expand_urls(args.reference)
    extractor = InceptionFeatures(device, batch_size=args.batch_size)
    cache = reference_cache_url(ref_urls, _manifest_sha(ref_urls), extractor.digest)
    sample_urls = expand_urls(samples)
    samples_sha = _manifest_sha(sample_urls)
    if _fid_already_done(args.out, samples_sha, cache, extractor.digest):
        if rank == 0:
            print(f"{storage.redact(args.out)}: already complete, nothing to do")
        dist.shutdown()
        return 0
    start = time.time()
    show = rank == 0 and not args.no_progress
    if storage.exists(cache):
        mu_r, sig_r, n_ref = load_stats_npz(storage.read_bytes(cache), cache)
        cached = True
    else:
        ref = _features_over(ref_urls, extractor, rank, world, args.batch_size, args.num_workers,
                             "FID reference", show)
        if rank == 0:
            storage.write_bytes(cache, ref.to_npz())
        mu_r, sig_r = ref.mean_cov()
        n_ref, cached = ref.count, False
    gen = _features_over(sample_urls, extractor, rank, world, args.batch_size, args.num_workers,
                         "FID samples", show)
    mu_s, sig_s = gen.mean_cov()
    fid = frechet_distance(mu_s, sig_s, mu_r, sig_r)
    result = {"fid": fid, "num_samples": gen.count, "num_reference": n_ref,
              "samples": storage.redact(args.samples), "reference": storage.redact(args.reference),
              "reference_stats": storage.redact(cache), "reference_stats_cached": cached,
              "network_sha256": extractor.digest, "samples_manifest_sha256": samples_sha,
              "wall_time_s": round(time.time() - start, 3)}
    if rank == 0:
        if args.out:
            storage.write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
    dist.shutdown()
    return 0


# ============================================================================ CLI


class _Progress:
    """Rich progress bar on rank 0 only (None elsewhere)."""

    def __new__(cls, enabled: bool, total: int, label: str):
        return super().__new__(cls) if enabled else None

    def __init__(self, enabled: bool, total: int, label: str):
        from rich.progress import Progress

        self.bar = Progress(transient=False)
        self.bar.start()
        self.task = self.bar.add_task(label, total=total)

    def update(self, completed: int) -> None:
        self.bar.update(self.task, completed=completed)

    def close(self) -> None:
        self.bar.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adpm_dist.evaluate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    n = sub.add_parser("nll", help="negative ELBO (bits/dim) table")
    n.add_argument("--checkpoint", required=True)
    n.add_argument("--gamma", default=None, help="Γ file (analytic-ddpm, optimal trajectory)")
    n.add_argument("--data", required=True, help="test shards (brace pattern, glob or list)")
    n.add_argument("--steps", required=True, help="comma list of K, e.g. 10,25,50,100,200,1000")
    n.add_argument("--methods", default="ddpm-tilde,ddpm-beta,analytic-ddpm")
    n.add_argument("--trajectory", default="even", help="comma list of even,quadratic,optimal")
    n.add_argument("--out", required=True, help="folder for nll.json and nll.md")
    n.add_argument("--batch-size", type=int, default=128)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--num-workers", type=int, default=1)
    n.add_argument("--flush-every", type=int, default=8, help="batches between partial-state flushes")
    n.add_argument("--per-image", action="store_true", help="also record every image's bits/dim")
    n.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate only the test images with id < N (a fixed subset for any world size)")
    n.add_argument("--precision", default="auto", choices=PRECISIONS)
    n.add_argument("--no-progress", action="store_true")
    f = sub.add_parser("fid", help="FID of a sample folder against reference shards")
    f.add_argument("--samples", required=True, help="sample folder (from adpm_dist.sample) or shard URLs")
    f.add_argument("--reference", required=True, help="reference shards, e.g. the test split")
    f.add_argument("--out", default=None, help="write the result JSON here too")
    f.add_argument("--batch-size", type=int, default=50)
    f.add_argument("--num-workers", type=int, default=1)
    f.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_nll(args) if args.command == "nll" else run_fid(args)
    except (CheckpointError, GammaFileError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
