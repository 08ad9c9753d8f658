"""The sharded Γ job: ``torchrun -m adpm_dist.estimate`` → one Γ file.

    torchrun --nproc_per_node P -m adpm_dist.estimate --checkpoint RUN_DIR_OR_WEIGHTS \
        --data URLS --out G.json [--samples-per-t M] [--timesteps all|LIST|even:K,…] \
        [--batch-size B] [--seed S] [--target-stderr E]

Work is (sample id × timestep) pairs. Each rank streams its share of the
evaluation data (every sample once across ranks), reads each x₀ batch ONCE and
reuses it for every requested timestep, packing pairs of mixed timesteps into
full forward batches. The noise of a pair is a function of (seed, sample id, t) alone
(:mod:`adpm_dist.stages.estimate_noise`: noise stream 2, one counter-based draw per batch;
``--noise-stream 1`` for the generators of older Γ files), so the Γ file does not depend on
world size, batch size or worker count (up to float64 summation order). The sums stay on the
device and reach the host once per round (:class:`~adpm_dist.gamma.accumulate.DeviceSums`).

State per t is (Σ v, Σ v², count) with v = ‖ε_θ‖²/d, float64/int64, and the same sums of
the model-error statistics a, a_raw, b, b_raw, c of each pair, with three scalar ones
(:mod:`adpm_dist.gamma.moments`), all from the forward pass that gives v. Ranks
advance in lock-step rounds of ``--flush-every`` data batches; after each round
every rank writes its partial state to ``OUT.partial/`` (atomically) and the
sums are all-reduced (for progress and early stopping). A rerun of the same job
resumes each rank from its partial state, skipping the pair ids already in it; a
rerun of a finished job is a no-op. "The same job" is its fingerprint: what
determines the numbers (model digest, the data's identity and samples, seed, M,
timesteps, --target-stderr, --precision, --noise-stream), not how paths are spelled nor
--num-workers, --data-batch, --batch-size, --flush-every or --compile. Rank 0 writes the Γ
file atomically and removes the partial state; a job that evaluated nothing at
some requested t is an error instead. Flags: :mod:`adpm_dist.stages.estimate_args`;
which pair ids are read: :mod:`adpm_dist.stages.estimate_data`.

``--target-stderr E`` stops once se(Γ_t) ≤ E at every requested t (at least
two flush rounds in). Why Γ_t's absolute error: Γ_t enters every step's
variance and every term of the trajectory cost only through the factor
1 − (β_{t|s}/β̄_t)Γ_t (σ² = (β_{t|s}/α_{t|s})·that factor; J(s, t) = log of it), and
β_{t|s}/β̄_t ≤ 1, so se(Γ_t) ≤ E bounds that factor's error by E for every
step s → t of every trajectory at once. (The covariance term (β̄_t/ᾱ_t)(1 − Γ_t)
would be the wrong target: its error is amplified by β̄_t/ᾱ_t, up to 1e8 at
large t, where the clip takes over anyway.) The criterion is on Γ alone: the model-error
moments come from the same pairs and carry their own standard errors in the file, but do not
decide when to stop.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from adpm_dist.diffusion.forward import q_sample
from adpm_dist.diffusion.stats import mean_stderr
from adpm_dist.errors import UsageError, UserError
from adpm_dist.gamma import GammaFile, GammaFileError, Moments, read_gamma, spans, write_gamma
from adpm_dist.gamma.accumulate import DeviceSums
from adpm_dist.gamma.moments import pair_errors_device
from adpm_dist.io import dist, storage
from adpm_dist.io.quality import DataSummary
from adpm_dist.models.compile import maybe_compiled
from adpm_dist.models.loading import (
    eps_function,
    load_checkpoint,
    numeric_mode,
    recorded_mode,
    resolve_precision,
)
from adpm_dist.stages.config_args import resolved_config
from adpm_dist.stages.estimate_args import build_parser, id_ranges, parse_timesteps
from adpm_dist.stages.estimate_data import data_plan, work_units
from adpm_dist.stages.estimate_noise import (  # noqa: F401 (stream 1, re-exported)
    NOISE_BLOCK,
    _runs,
    _seed_for,
    block_noise,
    pair_noise,
    partial_draw_exact,
)
from adpm_dist.stages.job import ShardedJob, diff, job_main

__all__ = ["GammaJob", "build_parser", "id_ranges", "main", "pair_noise", "parse_timesteps"]


class PairEvaluator:
    """Packs (x₀, t) pairs into forward batches of ``batch_size``; v = ‖ε‖²/d and the model-error
    statistics of each pair (:func:`~adpm_dist.gamma.moments.pair_errors_device`, same pass) go to
    ``sums`` (:class:`~adpm_dist.gamma.accumulate.DeviceSums`: on the device, no host copy per
    batch). ``t`` and ``half`` are buffered on the host; x₀ and the noise on the device."""

    def __init__(self, eps_fn, schedule, batch_size: int, sums: DeviceSums, device):
        self.eps_fn, self.schedule, self.batch_size = eps_fn, schedule, batch_size
        self.sums, self.device = sums, device
        self.buf_x: list[torch.Tensor] = []
        self.buf_t: list[torch.Tensor] = []
        self.buf_noise: list[torch.Tensor] = []
        self.buf_half: list[torch.Tensor] = []  # per pair: sample id parity (the Γ file's halves)
        self.pending = 0
        self.evaluations = 0

    def add(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, half: torch.Tensor) -> None:
        self.buf_half.append(half)
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
        x, t, noise, half = (torch.cat(b) for b in (self.buf_x, self.buf_t, self.buf_noise, self.buf_half))
        rest, rest_half = (x[size:], t[size:], noise[size:]), half[size:]
        x, t, noise, half = x[:size], t[:size], noise[:size], half[:size]
        t_dev = t.to(self.device, non_blocking=True)
        eps = self.eps_fn(q_sample(self.schedule, x, t_dev, noise), t_dev)
        flat = eps.reshape(size, -1).to(torch.float64)
        errors = pair_errors_device(self.schedule, x, t_dev, noise, eps, t.numpy())
        self.sums.add(t_dev, flat.pow(2).sum(dim=1) / flat.shape[1], errors,
                      half=half.to(self.device, non_blocking=True))
        self.evaluations += size
        self.buf_x, self.buf_t, self.buf_noise = ([r] if len(r) else [] for r in rest)
        self.buf_half = [rest_half] if len(rest_half) else []
        self.pending = len(rest[0])


def process_unit(ev: PairEvaluator, ids: torch.Tensor, x0: torch.Tensor, timesteps: np.ndarray, seed: int,
                 stream: int = 2):
    """All requested timesteps for one x₀ batch (read once), noise by (seed, id, t): one draw per
    16-timestep block (noise ``stream`` 2, or 1 as before: :func:`block_noise`)."""
    device = ev.device
    x0 = x0.to(device, non_blocking=True)
    shape = tuple(x0.shape[1:])
    blocks = (timesteps - 1) // NOISE_BLOCK
    for block in np.unique(blocks):
        ts = timesteps[blocks == block]
        noise = block_noise(ids, ts, int(block), seed, shape, x0.dtype, device, stream)
        k = len(ts)
        xs = x0[:, None].expand(-1, k, *shape).reshape(-1, *shape)
        tt = torch.as_tensor(ts, dtype=torch.int64).repeat(len(ids))
        ev.add(xs, tt, noise, (ids.cpu() % 2).repeat_interleave(k))


def settled(gf: GammaFile, timesteps: np.ndarray, target: float) -> bool:
    """Is se(Γ_t) ≤ target at every requested t (see the module docstring for why)?"""
    idx = timesteps - 1
    if np.any(gf.count[idx] < 2):
        return False
    _, se = mean_stderr(gf.sum[idx], gf.sum_sq[idx], gf.count[idx])
    return bool(np.all(se <= target))


def model_error_ranges(gf: GammaFile, timesteps: np.ndarray) -> list[dict]:
    """Timestep ranges where Γ_t > 1 or < 0 by more than 3 standard errors."""
    g, se = gf.gamma, gf.stderr
    out = []
    for label, bad in (("above 1", g - 1 > 3 * se), ("below 0", -g > 3 * se)):
        ts = [int(t) for t in timesteps if bad[t - 1]]
        out += [{"issue": f"Γ_t {label}", "t": [a, b - 1]} for a, b in id_ranges(ts)]
    return out


def warn_model_error(warnings: list[dict]) -> None:
    for issue in dict.fromkeys(w["issue"] for w in warnings):  # one line per issue
        spans = [w["t"] for w in warnings if w["issue"] == issue]
        where = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in spans[:8])
        more = f" and {len(spans) - 8} more ranges" if len(spans) > 8 else ""
        print(f"warning: {issue} by more than 3 standard errors at t = {where}{more} "
              "(model error; the analytic clip takes over there)", file=sys.stderr)


class GammaJob(ShardedJob):
    """The Γ job on the job core: per-rank sums in a GammaFile, all-reduced every round."""

    label = "Γ estimation (sample × t)"

    def __init__(self, args, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        self.loaded = load_checkpoint(args.checkpoint)
        self.timesteps = parse_timesteps(args.timesteps, self.loaded.schedule.num_timesteps)
        self.data_batch = args.data_batch or max(1, args.batch_size // NOISE_BLOCK)
        self.plan = data_plan(args.data)
        self.per_t = args.samples_per_t or self.plan.present  # default: every sample present, once
        self.device = dist.device_for(dist.env_info())
        self.precision = resolve_precision(args.precision, self.device, statistics=True)
        self.fingerprint = self.make_fingerprint(self.plan.key(), args.seed, self.per_t, self.timesteps)
        self.run_id = args.run_id or hashlib.sha256(json.dumps(
            [args.seed, self.fingerprint["data"], self.fingerprint["timesteps"]]).encode()).hexdigest()[:16]
        self.partial_dir = args.out + ".partial"
        self.show_progress = not args.no_progress
        self.progress_total = self.per_t * len(self.timesteps)
        data = {"urls": storage.redact(str(args.data)), "manifest": self.plan.manifest_url,
                "split": self.plan.split, "samples_per_t": self.per_t}
        self.sums = GammaFile.empty(self.loaded.schedule, self.loaded.describe(), data, moments=True,
                                    halves=True)
        self.totals = self.sums
        self.units_done, self.ids_seen, self.units, self.ev = 0, [], None, None
        self.data_summary = DataSummary()
        self.start = time.time()

    def make_fingerprint(self, data_key: dict, seed: int, per_t: int, timesteps: np.ndarray) -> dict:
        """What determines the numbers, and nothing else (docs/estimate.md): not the spelling of a
        path, nor --num-workers, --data-batch, --batch-size, --flush-every, --max-bad-fraction, --run-id."""
        return {"version": 2, "model": self.loaded.digest, "data": data_key, "seed": seed,
                "samples_per_t": per_t, "timesteps": id_ranges(timesteps),
                "target_stderr": self.args.target_stderr, "precision": self.precision,
                "noise_stream": self.args.noise_stream}

    def known_fingerprint(self, got: dict) -> dict:
        """A fingerprint from before ``version`` 2 in today's form, when it names the same pairs:
        its --data spelling is resolved from here, and its sample rule must agree with today's."""
        got = {"noise_stream": 1, **got} if isinstance(got, dict) else got  # before stream 2: stream 1
        if "version" in got:  # "auto" before modes were resolved: fp32 (recorded_mode)
            return {**got, "precision": recorded_mode(got["precision"])} if "precision" in got else got
        try:
            plan = data_plan(json.loads(got["data"]))
            ts = parse_timesteps(got["timesteps"], self.sums.num_timesteps)
            if not plan.old_rule_agrees(int(got["samples_per_t"])):
                return got
        except (UserError, OSError, KeyError, TypeError, ValueError):
            return got  # cannot be the same job: refused, showing the old fingerprint
        new = self.make_fingerprint(plan.key(), got.get("seed"), got["samples_per_t"], ts)
        new.update({k: got.get(k) for k in ("model", "target_stderr")})
        new["precision"], new["noise_stream"] = recorded_mode(got.get("precision")), got["noise_stream"]
        return {**new, "world_size": got["world_size"]} if "world_size" in got else new

    def existing(self) -> bool:
        if not storage.exists(self.args.out):
            return False
        try:
            done = read_gamma(self.args.out, require_complete=False)
        except GammaFileError as exc:
            raise GammaFileError(f"{exc} (refusing to overwrite it)") from None
        got = self.known_fingerprint(dict(done.extra.get("fingerprint") or {}))
        want = dict(self.fingerprint)
        got.pop("world_size", None), want.pop("world_size", None)
        if got == want and not done.has_moments():
            raise UsageError(f"{self.args.out} holds this estimate as a format-1 Γ file, without the "
                             "model-error moments (an earlier version wrote it); choose another --out or "
                             "remove it to estimate them")
        if got == want:
            return True
        raise UsageError(f"{self.args.out} exists and holds a different estimate ({diff(got, want)}); "
                         "choose another --out or remove it")

    def done_message(self) -> str:
        return f"{self.args.out}: already complete, nothing to do"

    def resume_summary(self, completed: int) -> str:
        where = storage.redact(self.partial_dir)
        return f"resumed from {where}: {completed}/{self.progress_total} (sample, t) evaluations done"

    def state_dict(self) -> dict:
        return {"units_done": self.units_done, "sum": self.sums.sum.tolist(),
                "sum_sq": self.sums.sum_sq.tolist(), "count": self.sums.count.tolist(),
                "moments": self.sums.moments.pack().tolist(), "ranges": id_ranges(self.ids_seen),
                **({"half": self.sums.half.pack().tolist()} if self.sums.half is not None else {})}

    def load_state(self, state: dict, source: str) -> None:
        n = self.sums.num_timesteps
        arrays = [np.asarray(state[k], dtype=np.float64) for k in ("sum", "sum_sq", "count")]
        if any(a.shape != (n,) for a in arrays):
            raise ValueError(f"sums must have length N={n}")
        if "moments" not in state:  # resuming would leave the earlier pairs out of the moments
            raise ValueError("written by a version without the model-error moments")
        self.sums.moments = Moments.unpack(state["moments"], n)
        if "half" in state:  # else: written before the halves were kept, so they are unknown (format 2)
            self.sums.half.unpack(np.asarray(state["half"], dtype=np.float64))
        else:
            self.sums.half = None
        self.sums.sum, self.sums.sum_sq, self.sums.count = arrays[0], arrays[1], arrays[2].astype(np.int64)
        self.units_done = int(state["units_done"])
        self.ids_seen = [i for lo, hi in state["ranges"] for i in range(lo, hi)]

    def step(self, round_index: int) -> bool:
        args = self.args
        if self.units is None:
            model = maybe_compiled(self.loaded.model, args.compile)
            eps_fn = eps_function(model, self.device, self.precision, statistics=True)
            self.acc = DeviceSums(self.sums, self.device)  # the sums stay on the device until round end
            self.ev = PairEvaluator(eps_fn, self.loaded.schedule, args.batch_size, self.acc, self.device)
            # Resume by pair id, not by batch count: batches depend on --num-workers/--data-batch.
            skip = np.array(sorted(self.ids_seen), dtype=np.int64)
            self.units = work_units(self.plan, args, self.rank, self.world, self.per_t, self.data_batch,
                                    self.data_summary, skip)
            self.start = time.time()
        done = 0
        more = False
        for ids, x in self.units:
            process_unit(self.ev, ids, x, self.timesteps, args.seed, args.noise_stream)
            self.ev.flush()
            self.units_done += 1
            self.ids_seen.extend(int(i) for i in ids)
            done += 1
            if done == args.flush_every:
                more = True
                break
        self.acc.sync()  # once per round: the partial state and the reduce read the host copy
        return more

    def reduce(self, rounds: int) -> tuple[int, bool]:
        self.totals = replace(self.sums).all_reduce()
        target = self.args.target_stderr
        enough = bool(target) and rounds >= 2 and settled(self.totals, self.timesteps, target)
        return int(self.totals.count.sum()), enough

    def payload(self):
        self.wall = time.time() - self.start
        draws = {"seed": self.args.seed, "data": self.plan.identity(), "timesteps": id_ranges(self.timesteps)}
        contributions = [{"run_id": self.run_id, "rank": self.rank, "world_size": self.world, "samples": r,
                          **draws} for r in id_ranges(self.ids_seen)]
        return {"contributions": contributions, "evaluations": self.ev.evaluations if self.ev else 0,
                "data": self.data_summary.to_dict()}

    def check_evaluated(self, gathered: list) -> None:
        """A job that evaluated nothing at some requested t is a user error, never an empty Γ file."""
        zero = [int(t) for t in self.timesteps if self.totals.count[t - 1] == 0]
        if zero:
            found = DataSummary()
            for g in gathered:
                found.merge(g["data"])
            raise UserError(f"--data {storage.redact(str(self.args.data))!r}: nothing was evaluated at t = "
                            f"{spans(zero)}; it lists {self.plan.describe()}, and reading them gave "
                            f"{found.report()}; no Γ file written")

    def write(self, gathered: list) -> None:
        self.check_evaluated(gathered)
        gf, ts, wall = self.totals, self.timesteps, self.wall
        evaluations = sum(g["evaluations"] for g in gathered)
        gf.contributions = sorted((c for g in gathered for c in g["contributions"]),
                                  key=lambda c: (c["samples"][0], c["rank"]))
        warnings = model_error_ranges(gf, ts)
        gf.extra = {"fingerprint": self.fingerprint, "wall_time_s": wall,
                    "evaluations_per_s": evaluations / max(wall, 1e-9),
                    "timesteps": self.args.timesteps, "model_error": warnings,
                    "numeric_mode": numeric_mode(self.precision, self.device),
                    "config": resolved_config(self.args)}  # how it was run; not its identity
        write_gamma(gf, self.args.out)
        warn_model_error(warnings)
        print(json.dumps({"out": storage.redact(self.args.out), "num_timesteps": gf.num_timesteps,
                          "samples_per_t_min": int(gf.count[ts - 1].min()),
                          "max_stderr": float(gf.stderr[ts - 1].max()),
                          "wall_time_s": round(wall, 3),
                          "evaluations_per_s": round(evaluations / max(wall, 1e-9), 1)}))


def check_argv(argv: list[str]) -> None:
    """The command line's user errors, without reading data or the checkpoint (launch calls it)."""
    build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return job_main(GammaJob, build_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
