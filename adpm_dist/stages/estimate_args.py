"""The command line of the Γ job (``adpm_dist.estimate``): every flag with its meaning, default
and units, every number checked as it is parsed (one ``error:`` line, exit 2), and ``--timesteps``."""

from __future__ import annotations

import numpy as np

from adpm_dist.diffusion.noise import DEFAULT_NOISE_STREAM, NOISE_STREAMS
from adpm_dist.diffusion.trajectory import even_trajectory, quadratic_trajectory
from adpm_dist.errors import UsageError, fraction, nonnegative_int, positive_float, positive_int
from adpm_dist.models.loading import PRECISIONS
from adpm_dist.stages.config_args import ConfigParser, add_config_options
from adpm_dist.stages.job import add_collective_timeout_flag

DESCRIPTION = ("The sharded Γ job: Γ_t = E‖ε_θ(x_t, t)‖²/d at each requested timestep t, from (sample, t) "
               "pairs of the evaluation data, written to one Γ file with the model's error moments from the "
               "same pairs (docs/estimate.md). Rerun the same command to resume it.")


def build_parser() -> ConfigParser:
    p = ConfigParser(prog="adpm_dist.estimate", description=DESCRIPTION)
    p.add_argument("--checkpoint", required=True,
                   help="the model: a training run dir (its EMA weights), a .safetensors weights file, or "
                        "diffusers:PATH (local, file:// or s3://)")
    p.add_argument("--data", required=True,
                   help="evaluation shards with manifest.json beside them: brace pattern, glob, folder or "
                        "comma list (local, file:// or s3://), all of one split; any subset of the split "
                        "works, and its samples keep their manifest ids")
    p.add_argument("--out", required=True,
                   help="the Γ file to write (local, file:// or s3://); partial state lives in OUT.partial/ "
                        "until it is written. An OUT from the same job makes the rerun a no-op")
    p.add_argument("--samples-per-t", type=positive_int, default=None, metavar="M",
                   help="samples (x₀ with its own noise) per timestep (default: every sample of --data "
                        "once; a larger M makes extra passes over the data, each with fresh noise)")
    p.add_argument("--timesteps", default="all", metavar="SPEC",
                   help="timesteps to estimate: 'all' (1..N), a list like 1,2,10-20, or the union of the "
                        "timesteps of K-step trajectories, even:K1,K2 or quadratic:K (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="B",
                   help="(sample, t) pairs per forward pass of the network; memory grows with it, the "
                        "result does not change (default: %(default)s)")
    p.add_argument("--data-batch", type=positive_int, default=None, metavar="D",
                   help="images x₀ read per data batch; each is reused for every requested timestep "
                        "(default: batch-size/16, at least 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed: the noise of a (sample id, t) pair depends on it alone, so runs with "
                        "other seeds add fresh samples when merged (default: %(default)s)")
    p.add_argument("--num-workers", type=nonnegative_int, default=2, metavar="W",
                   help="data loader worker processes per rank, 0 to read in the rank's own process; "
                        "does not change the result (default: %(default)s)")
    p.add_argument("--flush-every", type=positive_int, default=16, metavar="F",
                   help="data batches per round: after each round every rank saves its partial state (the "
                        "point a rerun resumes from) and the ranks add up their sums for the progress "
                        "display and --target-stderr (default: %(default)s)")
    p.add_argument("--target-stderr", type=positive_float, default=None, metavar="E",
                   help="stop early once the standard error of Γ_t is <= E at every requested t (Γ_t is "
                        "dimensionless, about 0..1; checked from the second round on; the model-error "
                        "moments do not enter it) (default: off, all M samples)")
    p.add_argument("--run-id", default=None, metavar="ID",
                   help="label recorded in the Γ file's contributions (default: derived from seed, data "
                        "and timesteps); it changes neither the numbers nor what counts as the same job")
    p.add_argument("--max-bad-fraction", type=fraction, default=0.0, metavar="P",
                   help="fraction (0..1) of bad samples (truncated tar, undecodable image, wrong size, "
                        "missing field) skipped before the job stops (default: %(default)s, stop at the "
                        "first); a job in which nothing could be evaluated fails even at 1")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="network arithmetic: fp32 (TF32 off), tf32, bf16 (autocast) or fp64; auto = fp32 "
                        "here on any device (Γ near t = N is ~1e-5 from 1, below bf16/TF32 error); fp64 "
                        "makes the result bit-stable across world sizes and batch sizes; the mode is "
                        "recorded in the output (default: %(default)s)")
    add_noise_flags(p)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress display (a bar on a terminal, progress lines otherwise)")
    add_collective_timeout_flag(p)
    add_config_options(p)
    return p


def add_noise_flags(p) -> None:
    """--noise-stream and --compile (neither changes which pairs are evaluated)."""
    p.add_argument("--noise-stream", type=int, default=DEFAULT_NOISE_STREAM, choices=NOISE_STREAMS,
                   help="how a pair's noise is drawn from (seed, id, t): 2 = one counter-based draw per "
                        "batch (adpm_dist.diffusion.noise), 1 = a torch generator per (id, 16 timesteps), "
                        "as before 2026-12 (to reproduce older Γ files); part of the job's identity "
                        "(default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (off by default; worth it on a GPU for "
                        "long jobs, slow to start on CPU); not part of the job's identity")


def parse_timesteps(spec: str, num_timesteps: int) -> np.ndarray:
    """'all', '1,5,10-20', or 'even:10,100' → sorted unique timesteps in 1..N (UsageError if not).

    ``KIND:K1,K2,…`` (KIND even or quadratic) is the union of the timesteps of
    those trajectories: the Γ that samplers and the NLL need on them, and no more.
    """
    if spec == "all":
        return np.arange(1, num_timesteps + 1)
    kind, colon, ks = spec.partition(":")
    if colon:
        if kind not in ("even", "quadratic"):
            raise UsageError(f"--timesteps {spec!r}: a trajectory union is even:K,… or quadratic:K,…")
        try:
            steps = [int(k) for k in ks.split(",") if k.strip()]
            make = even_trajectory if kind == "even" else quadratic_trajectory
            return np.unique(np.concatenate([make(num_timesteps, k) for k in steps]))
        except ValueError as exc:
            raise UsageError(f"--timesteps {spec!r}: {exc}") from None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                out.update(range(a, b + 1))
            elif part.strip():
                out.add(int(part))
    except ValueError:
        raise UsageError(f"--timesteps {spec!r}: use 'all' or a list such as 1,2,10-20") from None
    ts = np.array(sorted(out), dtype=np.int64)
    if ts.size == 0 or ts[0] < 1 or ts[-1] > num_timesteps:
        raise UsageError(f"--timesteps {spec!r}: timesteps must lie in 1..{num_timesteps}")
    return ts


def id_ranges(ids) -> list[list[int]]:
    """Sorted ids → half-open contiguous ranges [[start, end), …]."""
    out: list[list[int]] = []
    for i in sorted(int(i) for i in ids):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out
