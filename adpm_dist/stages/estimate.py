"""The sharded Γ job: ``torchrun -m adpm_dist.estimate`` → one Γ file.

    torchrun --nproc_per_node P -m adpm_dist.estimate --checkpoint RUN_DIR_OR_WEIGHTS \
        --data URLS --out G.json [--samples-per-t M] [--timesteps all|LIST|even:K,…] \
        [--batch-size B] [--seed S] [--target-stderr E]

Work is (sample id × timestep) pairs. Each rank streams its share of the
evaluation data (every sample once across ranks), reads each x₀ batch ONCE and
reuses it for every requested timestep, packing pairs of mixed timesteps into
full forward batches. The noise of a pair comes from a generator seeded by
(seed, sample id, block of 16 timesteps), so the Γ file does not depend on
world size, batch size or worker count (up to float64 summation order).

State per t is (Σ v, Σ v², count) with v = ‖ε_θ‖²/d, float64/int64. Ranks
advance in lock-step rounds of ``--flush-every`` data batches; after each round
every rank writes its partial state to ``OUT.partial/`` (atomically) and the
sums are all-reduced (for progress and early stopping). A rerun of the same
command resumes each rank from its partial state; a rerun of a finished job is
a no-op. Rank 0 writes the Γ file atomically and removes the partial state.

``--target-stderr E`` stops once se(Γ_t) ≤ E at every requested t (at least
two flush rounds in). Why Γ_t's absolute error: Γ_t enters every step's
variance and every term of the trajectory cost only through the factor
1 − (β_{t|s}/β̄_t)Γ_t (σ² = (β_{t|s}/α_{t|s})·that factor; J(s, t) = log of it), and
β_{t|s}/β̄_t ≤ 1, so se(Γ_t) ≤ E bounds that factor's error by E for every
step s → t of every trajectory at once. (The covariance term (β̄_t/ᾱ_t)(1 − Γ_t)
would be the wrong target: its error is amplified by β̄_t/ᾱ_t, up to 1e8 at
large t, where the clip takes over anyway.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch

from adpm_dist.diffusion.forward import q_sample
from adpm_dist.diffusion.trajectory import even_trajectory, quadratic_trajectory
from adpm_dist.gamma import GammaFile, GammaFileError, read_gamma, write_gamma
from adpm_dist.io import dist, storage
from adpm_dist.io.data import BadDataError
from adpm_dist.models.loading import PRECISIONS, CheckpointError, eps_function, load_checkpoint

NOISE_BLOCK = 16  # timesteps per noise generator: noise depends on (seed, id, t) only


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adpm_dist.estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, weights file, or diffusers:PATH")
    p.add_argument("--data", required=True, help="evaluation shards (brace pattern, glob or list)")
    p.add_argument("--out", required=True, help="the Γ file to write (local, file:// or s3://)")
    p.add_argument("--samples-per-t", type=int, default=None,
                   help="samples per timestep (default: every sample once; more → extra passes)")
    p.add_argument("--timesteps", default="all",
                   help="'all', a list like 1,2,10-20, or the trajectories to serve, like even:10,100")
    p.add_argument("--batch-size", type=int, default=256, help="(sample, t) pairs per forward pass")
    p.add_argument("--data-batch", type=int, default=None,
                   help="x₀ read per data batch (default batch-size/16: 16 timesteps mixed per pass)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers per rank")
    p.add_argument("--flush-every", type=int, default=16, help="data batches per round/partial flush")
    p.add_argument("--target-stderr", type=float, default=None, metavar="E",
                   help="stop early once every Γ_t has standard error <= E")
    p.add_argument("--run-id", default=None, help="id recorded in contributions (default: derived)")
    p.add_argument("--max-bad-fraction", type=float, default=0.0,
                   help="fraction of bad samples tolerated before the job stops")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on GPU, fp32 on CPU; fp64 for bit-stable invariance")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_timesteps(spec: str, num_timesteps: int) -> np.ndarray:
    """'all', '1,5,10-20', or 'even:10,100' → sorted unique timesteps in 1..N.

    ``KIND:K1,K2,…`` (KIND even or quadratic) is the union of the timesteps of
    those trajectories: the Γ that samplers and the NLL need on them, and no more.
    """
    if spec == "all":
        return np.arange(1, num_timesteps + 1)
    kind, colon, ks = spec.partition(":")
    if colon:
        if kind not in ("even", "quadratic"):
            raise ValueError(f"--timesteps {spec!r}: a trajectory union is even:K,… or quadratic:K,…")
        try:
            steps = [int(k) for k in ks.split(",") if k.strip()]
            make = even_trajectory if kind == "even" else quadratic_trajectory
            return np.unique(np.concatenate([make(num_timesteps, k) for k in steps]))
        except ValueError as exc:
            raise ValueError(f"--timesteps {spec!r}: {exc}") from None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                out.update(range(a, b + 1))
            elif part.strip():
                out.add(int(part))
    except ValueError:
        raise ValueError(f"--timesteps {spec!r}: use 'all' or a list such as 1,2,10-20") from None
    ts = np.array(sorted(out), dtype=np.int64)
    if ts.size == 0 or ts[0] < 1 or ts[-1] > num_timesteps:
        raise ValueError(f"--timesteps {spec!r}: timesteps must lie in 1..{num_timesteps}")
    return ts


def _seed_for(seed: int, sample_id: int, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{sample_id}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def pair_noise(seed: int, sample_id: int, block: int, shape, device) -> torch.Tensor:
    """Noise for timesteps NOISE_BLOCK·block+1 … NOISE_BLOCK·(block+1) of one sample."""
    g = torch.Generator(device=device)
    g.manual_seed(_seed_for(seed, sample_id, block))
    return torch.randn((NOISE_BLOCK, *shape), generator=g, device=device)


def id_ranges(ids: list[int]) -> list[list[int]]:
    """Sorted ids → half-open contiguous ranges [[start, end), …]."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


@dataclass
class RankState:
    """What one rank has accumulated; flushed to OUT.partial/rank-R-of-W.json."""

    fingerprint: dict
    num_timesteps: int
    units_done: int = 0
    sum: np.ndarray = None
    sum_sq: np.ndarray = None
    count: np.ndarray = None
    ranges: list = field(default_factory=list)

    def __post_init__(self):
        n = self.num_timesteps
        self.sum = np.zeros(n) if self.sum is None else self.sum
        self.sum_sq = np.zeros(n) if self.sum_sq is None else self.sum_sq
        self.count = np.zeros(n, dtype=np.int64) if self.count is None else self.count

    def to_json(self) -> str:
        return json.dumps({
            "fingerprint": self.fingerprint, "units_done": self.units_done,
            "sum": self.sum.tolist(), "sum_sq": self.sum_sq.tolist(),
            "count": self.count.tolist(), "ranges": self.ranges,
        })

    @classmethod
    def from_json(cls, text: str, num_timesteps: int, source: str) -> RankState:
        try:
            obj = json.loads(text)
            return cls(obj["fingerprint"], num_timesteps, int(obj["units_done"]),
                       np.asarray(obj["sum"], dtype=np.float64),
                       np.asarray(obj["sum_sq"], dtype=np.float64),
                       np.asarray(obj["count"], dtype=np.int64), obj["ranges"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{source}: unreadable partial state ({exc}); delete it to start over") from None


class PairEvaluator:
    """Packs (x₀, t) pairs into forward batches of ``batch_size`` and accumulates v = ‖ε‖²/d."""

    def __init__(self, eps_fn, schedule, batch_size: int, state: RankState, device):
        self.eps_fn, self.schedule, self.batch_size = eps_fn, schedule, batch_size
        self.state, self.device = state, device
        self.buf_x: list[torch.Tensor] = []
        self.buf_t: list[torch.Tensor] = []
        self.buf_noise: list[torch.Tensor] = []
        self.pending = 0
        self.evaluations = 0

    def add(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> None:
        self.buf_x.append(x0)
        self.buf_t.append(t)
        self.buf_noise.append(noise)
        self.pending += x0.shape[0]
        while self.pending >= self.batch_size:
            self._run(self.batch_size)

    def flush(self) -> None:
        if self.pending:
            self._run(self.pending)

    def _run(self, size: int) -> None:
        x, t, noise = (torch.cat(b) for b in (self.buf_x, self.buf_t, self.buf_noise))
        rest = (x[size:], t[size:], noise[size:])
        x, t, noise = x[:size], t[:size], noise[:size]
        eps = self.eps_fn(q_sample(self.schedule, x, t, noise), t)
        flat = eps.reshape(size, -1).to(torch.float64)
        v = (flat.pow(2).sum(dim=1) / flat.shape[1]).cpu().numpy()
        idx = t.cpu().numpy() - 1
        np.add.at(self.state.sum, idx, v)
        np.add.at(self.state.sum_sq, idx, v * v)
        np.add.at(self.state.count, idx, 1)
        self.evaluations += size
        self.buf_x, self.buf_t, self.buf_noise = ([r] if len(r) else [] for r in rest)
        self.pending = len(rest[0])


def process_unit(ev: PairEvaluator, ids: torch.Tensor, x0: torch.Tensor, timesteps: np.ndarray, seed: int):
    """All requested timesteps for one x₀ batch (read once), noise by (seed, id, t-block)."""
    device = ev.device
    x0 = x0.to(device)
    shape = tuple(x0.shape[1:])
    blocks = (timesteps - 1) // NOISE_BLOCK
    for block in np.unique(blocks):
        ts = timesteps[blocks == block]
        rows = torch.as_tensor(ts - 1 - NOISE_BLOCK * block, device=device)
        noise = torch.stack([pair_noise(seed, int(i), int(block), shape, device)[rows] for i in ids])
        k = len(ts)
        xs = x0[:, None].expand(-1, k, *shape).reshape(-1, *shape)
        tt = torch.as_tensor(ts, device=device).repeat(len(ids))
        ev.add(xs, tt, noise.reshape(-1, *shape))


def data_span(urls) -> tuple[int, int]:
    """(S, n): sample ids lie in [0, S) (the manifest split); n of them are in ``urls``."""
    from adpm_dist.io.data import eval_batches

    shards = eval_batches(urls, batch_size=1, rank=0, world_size=1, num_workers=0).dataset.shards
    return max(s.offset + s.count for s in shards), sum(s.count for s in shards)


def work_units(args, rank: int, world: int, total: int, per_t: int, data_batch: int):
    """This rank's (pair-sample ids, x₀) batches over ceil(M/S) passes of the data.

    Pass p gives sample id i the pair-sample id j = i + p·S, and keeps j < M: for a
    whole split that is exactly M samples per timestep, each with its own noise.
    """
    from adpm_dist.io.data import eval_batches

    passes = math.ceil(per_t / total)
    for p in range(passes):
        stream = eval_batches(args.data, batch_size=data_batch, rank=rank, world_size=world,
                              num_workers=args.num_workers, max_bad_fraction=args.max_bad_fraction)
        for ids, x in stream:
            j = ids + p * total
            keep = j < per_t
            if keep.any():
                yield j[keep], x[keep]


def settled(g_sum, g_sq, count, timesteps, target: float) -> bool:
    """Is se(Γ_t) ≤ target at every requested t (see the module docstring for why)?"""
    idx = timesteps - 1
    c = count[idx].astype(np.float64)
    if np.any(c < 2):
        return False
    mean = g_sum[idx] / c
    var = np.maximum(g_sq[idx] / c - mean**2, 0) * c / (c - 1)
    return bool(np.all(np.sqrt(var / c) <= target))


def model_error_ranges(gf: GammaFile, timesteps: np.ndarray) -> list[dict]:
    """Timestep ranges where Γ_t > 1 or < 0 by more than 3 standard errors."""
    g, se = gf.gamma, gf.stderr
    out = []
    for label, bad in (("above 1", g - 1 > 3 * se), ("below 0", -g > 3 * se)):
        ts = [int(t) for t in timesteps if bad[t - 1]]
        out += [{"issue": f"Γ_t {label}", "t": [a, b - 1]} for a, b in id_ranges(ts)]
    return out


def _partial_url(out: str, rank: int, world: int) -> str:
    return storage.join(out + ".partial", f"rank-{rank:05d}-of-{world:05d}.json")


def run(args) -> int:
    info = dist.init()
    rank, world = info.rank, info.world_size
    device = dist.device_for(info)
    loaded = load_checkpoint(args.checkpoint)
    schedule = loaded.schedule
    n_t = schedule.num_timesteps
    timesteps = parse_timesteps(args.timesteps, n_t)
    data_batch = args.data_batch or max(1, args.batch_size // NOISE_BLOCK)

    total, present = data_span(args.data)
    per_t = args.samples_per_t or present
    data_key = storage.redact(json.dumps(args.data))
    run_id = args.run_id or hashlib.sha256(
        json.dumps([args.seed, data_key, args.timesteps]).encode()).hexdigest()[:16]
    fingerprint = {
        "model": loaded.digest, "data": data_key, "seed": args.seed, "samples_per_t": per_t,
        "timesteps": args.timesteps, "world_size": world, "num_workers": args.num_workers,
        "data_batch": data_batch, "run_id": run_id, "target_stderr": args.target_stderr,
        "precision": args.precision,
    }

    # A finished job is a no-op; a different job's file is never overwritten.
    if storage.exists(args.out):
        try:
            done = read_gamma(args.out, require_complete=False)
        except GammaFileError as exc:
            raise GammaFileError(f"{exc} (refusing to overwrite it)") from None
        if done.extra.get("fingerprint") == fingerprint or (
            done.extra.get("fingerprint", {}).get("run_id") == run_id
            and {k: v for k, v in done.extra["fingerprint"].items() if k != "world_size"}
            == {k: v for k, v in fingerprint.items() if k != "world_size"}
        ):
            if rank == 0:
                print(f"{args.out}: already complete, nothing to do")
            dist.shutdown()
            return 0
        raise ValueError(f"{args.out} exists and holds a different estimate; "
                         "choose another --out or remove it")

    partial = _partial_url(args.out, rank, world)
    state = RankState(fingerprint, n_t)
    if storage.exists(partial):
        state = RankState.from_json(storage.read_text(partial), n_t, partial)
        if state.fingerprint != fingerprint:
            raise ValueError(f"{partial} was written by a different command "
                             f"({_diff(state.fingerprint, fingerprint)}); rerun it unchanged or delete it")

    eps_fn = eps_function(loaded.model, device, args.precision)
    ev = PairEvaluator(eps_fn, schedule, args.batch_size, state, device)
    units = islice(work_units(args, rank, world, total, per_t, data_batch), state.units_done, None)
    ids_seen: list[int] = []
    for lo, hi in state.ranges:
        ids_seen.extend(range(lo, hi))
    expected = per_t * len(timesteps)
    start = time.time()
    progress = _progress(rank == 0 and not args.no_progress, expected)
    reduced = None
    rounds = 0
    while True:
        done_local = 0
        for ids, x in islice(units, args.flush_every):
            process_unit(ev, ids, x, timesteps, args.seed)
            ev.flush()
            state.units_done += 1
            ids_seen.extend(int(i) for i in ids)
            done_local += 1
        state.ranges = id_ranges(ids_seen)
        storage.write_text(partial, state.to_json())
        more = 1.0 if done_local == args.flush_every else 0.0
        reduced = dist.all_reduce_sum(torch.tensor(
            np.concatenate([state.sum, state.sum_sq, state.count.astype(np.float64), [more]]),
            dtype=torch.float64)).numpy()
        g_sum, g_sq, g_count = reduced[:n_t], reduced[n_t:2 * n_t], reduced[2 * n_t:3 * n_t]
        if progress:
            progress.update(int(g_count.sum()))
        if reduced[-1] == 0:
            break
        rounds += 1
        if args.target_stderr and rounds >= 2 and settled(g_sum, g_sq, g_count, timesteps,
                                                          args.target_stderr):
            break
    wall = time.time() - start
    if progress:
        progress.close()

    contributions = dist.all_gather_object(
        [{"run_id": run_id, "rank": rank, "world_size": world, "samples": r} for r in state.ranges])
    evaluations = dist.all_reduce_sum(torch.tensor([float(ev.evaluations)], dtype=torch.float64)).item()
    if rank == 0:
        gf = GammaFile.empty(schedule, loaded.describe(), {"urls": data_key, "samples_per_t": per_t})
        gf.sum, gf.sum_sq = g_sum.copy(), g_sq.copy()
        gf.count = np.rint(reduced[2 * n_t:3 * n_t]).astype(np.int64)
        gf.contributions = sorted((c for rc in contributions for c in rc),
                                  key=lambda c: (c["samples"][0], c["rank"]))
        warnings = model_error_ranges(gf, timesteps)
        gf.extra = {"fingerprint": fingerprint, "wall_time_s": wall,
                    "evaluations_per_s": evaluations / max(wall, 1e-9),
                    "timesteps": args.timesteps, "model_error": warnings}
        write_gamma(gf, args.out)
        for issue in dict.fromkeys(w["issue"] for w in warnings):  # one line per issue
            spans = [w["t"] for w in warnings if w["issue"] == issue]
            where = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in spans[:8])
            more = f" and {len(spans) - 8} more ranges" if len(spans) > 8 else ""
            print(f"warning: {issue} by more than 3 standard errors at t = {where}{more} "
                  "(model error; the analytic clip takes over there)", file=sys.stderr)
        print(json.dumps({"out": storage.redact(args.out), "num_timesteps": n_t,
                          "samples_per_t_min": int(gf.count[timesteps - 1].min()),
                          "max_stderr": float(gf.stderr[timesteps - 1].max()),
                          "wall_time_s": round(wall, 3),
                          "evaluations_per_s": round(evaluations / max(wall, 1e-9), 1)}))
    dist.barrier()
    storage.remove(partial)
    dist.barrier()
    if rank == 0:
        storage.remove(args.out + ".partial", recursive=True)
    dist.shutdown()
    return 0


def _diff(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys)


class _progress:
    """A rich progress bar over (sample, t) evaluations, on rank 0 only."""

    def __new__(cls, enabled: bool, total: int):
        if not enabled:
            return None
        return super().__new__(cls)

    def __init__(self, enabled: bool, total: int):
        from rich.progress import Progress

        self.bar = Progress(transient=False)
        self.bar.start()
        self.task = self.bar.add_task("Γ estimation (sample × t)", total=total)

    def update(self, completed: int) -> None:
        self.bar.update(self.task, completed=completed)

    def close(self) -> None:
        self.bar.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, GammaFileError, ValueError, FileNotFoundError, PermissionError,
            BadDataError) as exc:
        # Bad input or refused access: one line naming the file, exit 2 (as sample/evaluate).
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
