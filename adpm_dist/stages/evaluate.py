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

import hashlib
import json
import sys
import time
from itertools import islice

import numpy as np
import torch

from adpm_dist.diffusion.analytic import ANALYTIC_METHODS, DDPM_FAMILY
from adpm_dist.diffusion.likelihood import negative_elbos
from adpm_dist.diffusion.samplers import make_generators
from adpm_dist.diffusion.stats import mean_stderr
from adpm_dist.diffusion.trajectory import TRAJECTORIES
from adpm_dist.errors import UsageError
from adpm_dist.gamma import load_for
from adpm_dist.io import dist, storage
from adpm_dist.models.loading import PRECISIONS, eps_function, load_checkpoint
from adpm_dist.stages.job import (
    Parser,
    Progress,
    ShardedJob,
    main_wrapper,
    resolve_trajectory,
    run_job,
    together,
)

# ============================================================================ NLL


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def image_seed(seed: int, image_id: int) -> int:
    """Seed of image ``image_id``'s noise: a hash, so nearby (seed, id) pairs share nothing."""
    digest = hashlib.blake2b(f"nll:{seed}:{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def config_key(trajectory: str, steps: int, method: str) -> str:
    return f"{trajectory}/K={steps}/{method}"


FIELDS = ("bpd", "bpd_sq", "prior", "steps", "decoder")


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


def parse_configs(args) -> tuple[list[int], list[str], list[str]]:
    """(K list, methods, trajectories) from the flags; UsageError naming the flag when bad."""
    try:
        steps = [int(k) for k in _csv(args.steps)]
    except ValueError:
        raise UsageError(f"--steps {args.steps!r}: a comma list of integers, e.g. 10,25,50") from None
    methods, trajectories = _csv(args.methods), _csv(args.trajectory)
    for m in methods:
        if m not in DDPM_FAMILY:
            raise UsageError(f"--methods: the ELBO is defined for {list(DDPM_FAMILY)}, not {m!r}")
    for t in trajectories:
        if t not in TRAJECTORIES:
            raise UsageError(f"--trajectory: unknown {t!r}; choose from {list(TRAJECTORIES)}")
    if args.gamma is None and (set(methods) & set(ANALYTIC_METHODS) or "optimal" in trajectories):
        raise UsageError("analytic methods and the optimal trajectory need --gamma (a Γ file)")
    return steps, methods, trajectories


class NllJob(ShardedJob):
    """Every test image once, under every (trajectory, K, method); per-configuration sums per rank."""

    label = "NLL (test images)"

    def __init__(self, args, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        self.steps, self.methods, self.trajectories = parse_configs(args)
        self.loaded = load_checkpoint(args.checkpoint)
        self.ref = load_for(self.loaded, args.gamma) if args.gamma else None
        self.gamma = self.ref.gamma if self.ref else None
        sched = self.loaded.schedule
        self.taus = {(t, k): resolve_trajectory(t, sched, k, self.gamma)
                     for t in self.trajectories for k in self.steps}
        self.keys = [config_key(t, k, m) for t in self.trajectories for k in self.steps for m in self.methods]
        self.fingerprint = {
            "model": self.loaded.digest, "gamma_sha256": self.ref.sha256 if self.ref else None,
            "data": storage.redact(json.dumps(args.data)), "seed": args.seed, "keys": self.keys,
            "precision": args.precision, "per_image": args.per_image, "batch_size": args.batch_size,
            "num_workers": args.num_workers, "limit": args.limit,
        }
        self.out_json = storage.join(args.out, "nll.json")
        self.partial_dir = storage.join(args.out, "nll.partial")
        self.show_progress = not args.no_progress
        self.units_done, self.count, self.batches = 0, 0, None
        from adpm_dist.io.data import eval_batches

        self.stream = eval_batches(args.data, batch_size=args.batch_size, rank=rank, world_size=world,
                                   num_workers=args.num_workers)
        # --limit keeps the images with id < LIMIT: the same subset for any world size.
        total = self.stream.total
        self.progress_total = total if args.limit is None else min(total, args.limit)
        self.sums = {k: dict.fromkeys(FIELDS, 0.0) for k in self.keys}
        self.per_image: dict[str, dict[str, float]] = {}  # id → {key: bpd}, only with --per-image

    def existing(self) -> bool:
        if not storage.exists(self.out_json):
            return False
        try:
            done = json.loads(storage.read_text(self.out_json))
        except json.JSONDecodeError:
            done = {}
        if isinstance(done, dict) and done.get("fingerprint") == self.fingerprint:
            return True
        raise UsageError(f"{self.out_json} exists and holds a different evaluation; choose another --out")

    def done_message(self) -> str:
        return f"{storage.redact(self.out_json)}: already complete, nothing to do"

    def state_dict(self) -> dict:
        return {"units_done": self.units_done, "count": self.count, "sums": self.sums,
                "per_image": self.per_image}

    def load_state(self, state: dict, source: str) -> None:
        if sorted(state["sums"]) != sorted(self.keys):
            raise ValueError("configurations differ")
        self.units_done, self.count = int(state["units_done"]), int(state["count"])
        self.sums, self.per_image = state["sums"], state["per_image"]

    def _open(self) -> None:
        self.device = dist.device_for(dist.env_info())
        self.eps_fn = eps_function(self.loaded.model, self.device, self.args.precision)
        self.batches = islice(self.stream, self.units_done, None)
        self.start = time.time()

    def step(self, round_index: int) -> bool:
        if self.batches is None:
            self._open()
        args, n_local = self.args, 0
        for ids, x in islice(self.batches, args.flush_every):
            ids_list = [int(i) for i in ids]
            if args.limit is not None:
                keep = [j for j, i in enumerate(ids_list) if i < args.limit]
                ids_list, x = [ids_list[j] for j in keep], x[keep]
            if ids_list:
                self._evaluate(ids_list, x.to(self.device))
            self.units_done += 1
            self.count += len(ids_list)
            n_local += 1
        return n_local == args.flush_every

    def _evaluate(self, ids: list[int], x0: torch.Tensor) -> None:
        for (traj, k), tau in self.taus.items():
            # One pass of K ε evaluations serves every method (they differ only in σ²).
            gens = make_generators([image_seed(self.args.seed, i) for i in ids], device=self.device)
            outs = negative_elbos(self.eps_fn, self.loaded.schedule, tau, self.methods, x0, gens,
                                  gamma=self.gamma)
            for method in self.methods:
                key = config_key(traj, k, method)
                out, s = outs[method], self.sums[key]
                bpd = out["bpd"].to(torch.float64)
                s["bpd"] += float(bpd.sum())
                s["bpd_sq"] += float((bpd * bpd).sum())
                for f in ("prior", "steps", "decoder"):
                    s[f] += float(out[f].sum())
                if self.args.per_image:
                    for i, v in zip(ids, bpd.tolist()):
                        self.per_image.setdefault(str(i), {})[key] = v

    def reduce(self, rounds: int) -> tuple[int, bool]:
        total = dist.all_reduce_sum(torch.tensor([float(self.count)], dtype=torch.float64))
        return int(total[0]), False

    def payload(self):
        self.wall = time.time() - self.start
        return {"count": self.count, "sums": self.sums, "per_image": self.per_image}

    def write(self, gathered: list) -> None:
        count = sum(g["count"] for g in gathered)
        if count != self.progress_total:
            raise RuntimeError(f"evaluated {count} images but the data holds {self.progress_total}")
        results = {}
        for key in self.keys:
            s = {f: sum(g["sums"][key][f] for g in gathered) for f in FIELDS}
            mean, se = mean_stderr(s["bpd"], s["bpd_sq"], count)
            results[key] = {"bpd": float(mean), "bpd_stderr": float(se), "count": count,
                            "prior_nats": s["prior"] / count, "steps_nats": s["steps"] / count,
                            "decoder_nats": s["decoder"] / count}
        doc = {"format": "adpm-nll/1", "fingerprint": self.fingerprint, "model": self.loaded.describe(),
               "schedule": self.loaded.schedule.describe(), "gamma_sha256": self.fingerprint["gamma_sha256"],
               "trajectories": {f"{t}/K={k}": [int(v) for v in tau] for (t, k), tau in self.taus.items()},
               "results": results, "num_images": count, "wall_time_s": self.wall, "world_size": self.world}
        if self.args.per_image:
            per_image = {i: row for g in gathered for i, row in g["per_image"].items()}
            doc["per_image_bpd"] = dict(sorted(per_image.items(), key=lambda kv: int(kv[0])))
        table = nll_table(results, self.trajectories, self.steps, self.methods)
        storage.write_text(storage.join(self.args.out, "nll.md"),
                           f"Negative ELBO, bits/dim (± standard error over {count} images)\n\n{table}")
        storage.write_text(self.out_json, json.dumps(doc, indent=1))
        print(table)


def run_nll(args) -> int:
    info = dist.init()
    return run_job(together(lambda: NllJob(args, info.rank, info.world_size)))


# ============================================================================ FID


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
    from adpm_dist.models.fid import InceptionFeatures, frechet_distance, load_stats_npz

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
    show = not args.no_progress
    if storage.exists(cache):
        mu_r, sig_r, n_ref = load_stats_npz(storage.read_bytes(cache), cache)
        cached = True
    else:
        ref = _features_over(ref_urls, extractor, rank, world, args.batch_size, args.num_workers,
                             "FID reference", show)
        together(lambda: storage.write_bytes(cache, ref.to_npz()), rank0_only=True)
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
    def write() -> None:
        if args.out:
            storage.write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))

    together(write, rank0_only=True)
    dist.shutdown()
    return 0


def build_parser() -> Parser:
    p = Parser(prog="adpm_dist.evaluate", description=__doc__.split("\n\n")[0])
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
    def _main(a):
        args = build_parser().parse_args(a)
        return run_nll(args) if args.command == "nll" else run_fid(args)

    return main_wrapper(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
