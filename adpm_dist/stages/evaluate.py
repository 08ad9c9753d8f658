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
partial sums, with the ids of the images they cover, every ``--flush-every``
evaluated batches, so an interrupted run resumes — with any ``--num-workers``,
which changes how a rank's images are batched but not which images it owns; a
finished one is a no-op. Writes ``OUT/nll.json`` and ``OUT/nll.md``.

FID (:mod:`adpm_dist.stages.evaluate_fid`)::

    python -m adpm_dist.evaluate fid --samples SAMPLES_DIR --reference TEST_URLS [--out fid.json]
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter

import torch

from adpm_dist.diffusion.analytic import ANALYTIC_METHODS, DDPM_FAMILY, RESIDUAL_METHODS
from adpm_dist.diffusion.conventions import OURS, Conventions
from adpm_dist.diffusion.likelihood import negative_elbos
from adpm_dist.diffusion.samplers import make_generators
from adpm_dist.diffusion.stats import mean_stderr
from adpm_dist.diffusion.trajectory import TRAJECTORIES
from adpm_dist.errors import UsageError
from adpm_dist.gamma import load_for, require_moments
from adpm_dist.io import dist, storage
from adpm_dist.models.loading import (
    eps_function,
    load_checkpoint,
    numeric_mode,
    recorded_mode,
    resolve_precision,
)
from adpm_dist.stages.config_args import resolved_config
from adpm_dist.stages.conventions import (
    LEGACY,
    conventions_from,
    dp_cost_for,
    gamma_stderr,
    trajectory_options,
)
from adpm_dist.stages.evaluate_args import build_parser
from adpm_dist.stages.evaluate_fid import run_fid
from adpm_dist.stages.job import ShardedJob, main_wrapper, resolve_trajectory, run_job, together

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
    if not steps or min(steps) < 2:
        raise UsageError(f"--steps {args.steps!r}: a comma list of step counts K >= 2, e.g. 10,25,50")
    methods, trajectories = _csv(args.methods), _csv(args.trajectory)
    for flag, values in (("--methods", methods), ("--trajectory", trajectories)):
        if not values:
            raise UsageError(f"{flag} {getattr(args, flag[2:])!r}: empty list")
    for m in methods:
        if m not in DDPM_FAMILY:
            raise UsageError(f"--methods: the ELBO is defined for {list(DDPM_FAMILY)}, not {m!r}")
    if args.gamma is None and set(methods) & set(RESIDUAL_METHODS):
        raise UsageError("residual-ddpm needs --gamma (a Γ file with the model-error moments)")
    for t in trajectories:
        if t not in TRAJECTORIES:
            raise UsageError(f"--trajectory: unknown {t!r}; choose from {list(TRAJECTORIES)}")
    if args.gamma is None and (set(methods) & set(ANALYTIC_METHODS) or "optimal" in trajectories):
        raise UsageError("analytic methods and the optimal trajectory need --gamma (a Γ file)")
    return steps, methods, trajectories


def shard_identity(urls: list[str]) -> list[str]:
    """The shards by canonical location: ``shards/x.tar`` and ``/abs/shards/x.tar`` are one input."""
    return [storage.redact(storage.canonical(u)) for u in urls]


def id_ranges(ids) -> list[list[int]]:
    """Sorted ids as [lo, hi) runs: a rank's evaluated images stay a few numbers in its state."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def upgrade_legacy(fingerprint, conventions: dict) -> dict | None:
    """The fingerprint an nll.json written before paths were canonical would have today (its
    data spec expanded and canonicalised, num_workers dropped, the official-code switches as
    that version made them: ``conventions``); None for any other value."""
    from adpm_dist.io.shards import expand_urls

    if not isinstance(fingerprint, dict) or "num_workers" not in fingerprint:
        return None
    try:
        urls = expand_urls(json.loads(fingerprint["data"]))
    except (KeyError, TypeError, ValueError, OSError):  # OSError: storage's errors (gone, refused)
        return None
    old = {k: v for k, v in fingerprint.items() if k != "num_workers"}
    return {**old, "data": shard_identity(urls), "conventions": conventions}


def discard_legacy_partial(partial_dir: str) -> None:
    """Partial state written before resume went by image ids counted batches, which another
    --num-workers would misplace: it is deleted (with a warning) and the evaluation starts over."""
    if not storage.exists(partial_dir):
        return
    for url in storage.listdir(partial_dir):
        try:
            legacy = "units_done" in json.loads(storage.read_text(url))
        except (ValueError, TypeError):
            continue  # unreadable: the job core reports it, naming the file
        if legacy:
            print(f"warning: {storage.redact(url)}: partial state of an earlier version (batch counts, "
                  "not image ids); discarded, this evaluation starts over", file=sys.stderr)
            storage.remove(url)


def shared_trajectories(taus: dict) -> list[tuple[str, int, list[int], list[str]]]:
    """(trajectory, K, τ, methods on that τ) groups, in a fixed order."""
    groups: dict[tuple, list[str]] = {}
    for (traj, k, method), tau in taus.items():
        groups.setdefault((traj, k, tuple(int(v) for v in tau)), []).append(method)
    return [(traj, k, list(tau), methods) for (traj, k, tau), methods in groups.items()]


def trajectories_record(taus: dict) -> dict:
    """nll.json's "trajectories": ``traj/K=k`` → τ where every method shares it, else
    ``traj/K=k/method`` → each method's own."""
    out, groups = {}, shared_trajectories(taus)
    per_config = Counter((traj, k) for traj, k, _, _ in groups)  # distinct τ per (trajectory, K)
    for traj, k, tau, methods in groups:
        if per_config[traj, k] == 1:
            out[f"{traj}/K={k}"] = tau
        else:
            out.update({f"{traj}/K={k}/{m}": tau for m in methods})
    return out


class NllJob(ShardedJob):
    """Every test image once, under every (trajectory, K, method); per-configuration sums per rank."""

    label = "NLL (test images)"

    def __init__(self, args, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        self.steps, self.methods, self.trajectories = parse_configs(args)
        self.loaded = load_checkpoint(args.checkpoint)
        self.ref = load_for(self.loaded, args.gamma) if args.gamma else None
        self.gamma = self.ref.gamma if self.ref else None
        self.device = dist.device_for(dist.env_info())
        self.precision = resolve_precision(args.precision, self.device, statistics=True)
        self.conventions = conv = conventions_from(args)
        self.moments = None
        if set(self.methods) & set(RESIDUAL_METHODS):
            self.moments = require_moments(self.ref, "--methods residual-ddpm", conv.nll_clip_x0)
        self.taus = self._trajectories()
        self.groups = shared_trajectories(self.taus)  # the passes each batch makes, computed once
        self.keys = [config_key(t, k, m) for t in self.trajectories for k in self.steps for m in self.methods]
        from adpm_dist.io.data import eval_batches

        self.stream = eval_batches(args.data, batch_size=args.batch_size, rank=rank, world_size=world,
                                   num_workers=args.num_workers)
        # What determines the result: the shards by canonical location (any spelling of the same
        # files is the same job), never --num-workers or --flush-every.
        self.fingerprint = {
            "model": self.loaded.digest, "gamma_sha256": self.ref.sha256 if self.ref else None,
            "data": shard_identity([s.url for s in self.stream.shards]), "seed": args.seed, "keys": self.keys,
            "precision": self.precision, "per_image": args.per_image, "batch_size": args.batch_size,
            "limit": args.limit, "conventions": self._relevant_conventions(conv),
        }
        self.out_json = storage.join(args.out, "nll.json")
        self.partial_dir = storage.join(args.out, "nll.partial")
        self.show_progress = not args.no_progress
        self.done: set[int] = set()  # ids of the images this rank has evaluated
        self.count, self.batches = 0, None
        # --limit keeps the images with id < LIMIT: the same subset for any world size.
        total = self.stream.total
        self.progress_total = total if args.limit is None else min(total, args.limit)
        self.sums = {k: dict.fromkeys(FIELDS, 0.0) for k in self.keys}
        self.per_image: dict[str, dict[str, float]] = {}  # id → {key: bpd}, only with --per-image

    def _trajectories(self) -> dict:
        """τ per (trajectory, K, method): the optimal trajectory under the expected-NELBO cost is
        each method's own; every other is shared by the methods."""
        sched, conv, taus = self.loaded.schedule, self.conventions, {}
        for traj in self.trajectories:
            for k in self.steps:
                for m in self.methods:
                    opts = trajectory_options(conv, m, traj, self.ref, conv.nll_clip_x0)
                    taus[traj, k, m] = resolve_trajectory(traj, sched, k, self.gamma, **opts)
        return taus

    def _relevant_conventions(self, conv) -> dict:
        """The switches that change these numbers (missing in files of earlier versions: LEGACY)."""
        out = {"nll_clip_x0": conv.nll_clip_x0}
        if "optimal" in self.trajectories or set(self.methods) & set(ANALYTIC_METHODS):
            out["covariance_fit"] = conv.covariance_fit
        if "optimal" in self.trajectories:
            out["dp_cost"] = dp_cost_for(conv, self.ref)
        if "even" in self.trajectories:
            out["even_rounding"] = conv.even_rounding
        if conv.decoder != "exact":  # recorded only when not ours, so earlier files still match
            out["decoder"] = conv.decoder
        return out

    def existing(self) -> bool:
        discard_legacy_partial(self.partial_dir)
        if not storage.exists(self.out_json):
            return False
        try:
            done = json.loads(storage.read_text(self.out_json))
        except json.JSONDecodeError:
            done = {}
        found = done.get("fingerprint") if isinstance(done, dict) else None
        legacy = self._relevant_conventions(Conventions(**{**OURS.describe(), **LEGACY}))
        if isinstance(found, dict) and "precision" in found:
            found = {**found, "precision": recorded_mode(found["precision"])}
        if found == self.fingerprint or upgrade_legacy(found, legacy) == self.fingerprint:
            return True
        raise UsageError(f"{storage.redact(self.out_json)} exists and holds a different evaluation; "
                         "choose another --out")

    def done_message(self) -> str:
        return f"{storage.redact(self.out_json)}: already complete, nothing to do"

    def state_dict(self) -> dict:
        return {"done": id_ranges(self.done), "count": self.count, "sums": self.sums,
                "per_image": self.per_image}

    def load_state(self, state: dict, source: str) -> None:
        if sorted(state["sums"]) != sorted(self.keys):
            raise ValueError("configurations differ")
        self.done = {i for lo, hi in state["done"] for i in range(int(lo), int(hi))}
        self.count = int(state["count"])
        if self.count != len(self.done):
            raise ValueError(f"count {self.count} but {len(self.done)} image ids")
        self.sums, self.per_image = state["sums"], state["per_image"]

    def _open(self) -> None:
        self.eps_fn = eps_function(self.loaded.model, self.device, self.precision, statistics=True)
        if self.ref is not None and self.rank == 0:
            warning = self.ref.mode_warning(self.precision)
            if warning:
                print(warning, file=sys.stderr)
        self.batches = iter(self.stream)
        self.start = time.time()

    def step(self, round_index: int) -> bool:
        """Up to --flush-every batches with work; images already evaluated (a resume) are skipped."""
        if self.batches is None:
            self._open()
        args, worked = self.args, 0
        for ids, x in self.batches:
            ids = ids.tolist()
            keep = [j for j, i in enumerate(ids)
                    if i not in self.done and (args.limit is None or i < args.limit)]
            if not keep:
                continue
            todo = [ids[j] for j in keep]
            self._evaluate(todo, x[keep].to(self.device))
            self.done.update(todo)
            self.count += len(todo)
            worked += 1
            if worked == args.flush_every:
                return True
        return False

    def _evaluate(self, ids: list[int], x0: torch.Tensor) -> None:
        conv = self.conventions
        for traj, k, tau, methods in self.groups:
            # One pass of K ε evaluations serves every method on τ (they differ only in σ²).
            gens = make_generators([image_seed(self.args.seed, i) for i in ids], device=self.device)
            outs = negative_elbos(self.eps_fn, self.loaded.schedule, tau, methods, x0, gens,
                                  gamma=self.gamma, clip_x0=conv.nll_clip_x0, moments=self.moments,
                                  fit=conv.covariance_fit, gamma_stderr=gamma_stderr(self.ref),
                                  decoder=conv.decoder)
            for method in methods:
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
               "trajectories": trajectories_record(self.taus), "conventions": self.conventions.describe(),
               "numeric_mode": numeric_mode(self.precision, self.device),
               "results": results, "num_images": count, "wall_time_s": self.wall, "world_size": self.world,
               "config": resolved_config(self.args)}  # how it was run; the fingerprint is its identity
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


def check_argv(argv: list[str]) -> None:
    """The command line's user errors, without reading data or the checkpoint (launch calls it)."""
    args = build_parser().parse_args(argv)
    if args.command == "nll":
        parse_configs(args)


def main(argv: list[str] | None = None) -> int:
    def _main(a):
        args = build_parser().parse_args(a)
        return run_nll(args) if args.command == "nll" else run_fid(args)

    return main_wrapper(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
