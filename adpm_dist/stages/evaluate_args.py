"""The flags of ``python -m adpm_dist.evaluate nll|fid``: what each does, its default and unit,
which methods it applies to; every number is checked when parsed (one ``error:`` line, exit 2)."""

from __future__ import annotations

from adpm_dist.errors import nonnegative_int, positive_int
from adpm_dist.models.loading import FID_PRECISIONS, PRECISIONS
from adpm_dist.stages.config_args import ConfigParser, add_config_options
from adpm_dist.stages.conventions import add_convention_flags
from adpm_dist.stages.job import add_collective_timeout_flag

WORKERS_HELP = ("data-loading processes per rank (>= 0; 0: read in the main process); speed only, not "
                "part of the result. Default: %(default)s")


def _nll_parser(sub) -> None:
    n = sub.add_parser("nll", help="negative ELBO (bits/dim) table, the paper's Table 1",
                       description="Negative ELBO in bits/dim of every test image under every "
                                   "(trajectory, K, method); resumable, a finished --out is a no-op.")
    n.add_argument("--checkpoint", required=True,
                   help="the ε-network: a training run folder, a .safetensors weights file, or "
                        "diffusers:PATH")
    n.add_argument("--gamma", default=None, metavar="G.json",
                   help="Γ file estimated for this model; needed by analytic-ddpm, residual-ddpm (a file "
                        "with the model-error moments) and --trajectory optimal")
    n.add_argument("--data", required=True,
                   help="test shards with their manifest: brace pattern, glob, folder or comma list "
                        "(local, file:// or s3://)")
    n.add_argument("--steps", required=True, metavar="K,K,…",
                   help="comma list of step counts K, each 2 <= K <= N, e.g. 10,25,50,100,200,1000")
    n.add_argument("--methods", default="ddpm-tilde,ddpm-beta,analytic-ddpm",
                   help="comma list of DDPM-family variance rules (the ELBO needs σ² > 0): ddpm-beta, "
                        "ddpm-tilde, analytic-ddpm, residual-ddpm. Default: %(default)s")
    n.add_argument("--trajectory", default="even",
                   help="comma list of trajectories: even, quadratic, optimal (optimal needs --gamma). "
                        "Default: %(default)s")
    n.add_argument("--out", required=True, help="folder for nll.json and nll.md (local, file:// or s3://)")
    n.add_argument("--batch-size", type=positive_int, default=128, metavar="B",
                   help="images per network call, per rank (>= 1). Default: %(default)s")
    n.add_argument("--seed", type=nonnegative_int, default=0,
                   help="noise seed: image i's noise comes from hash(SEED, i) (>= 0). Default: %(default)s")
    n.add_argument("--num-workers", type=nonnegative_int, default=1, help=WORKERS_HELP)
    n.add_argument("--flush-every", type=positive_int, default=8, metavar="B",
                   help="evaluated batches between partial-state writes (the work a kill can lose; "
                        ">= 1); not part of the result. Default: %(default)s")
    n.add_argument("--per-image", action="store_true",
                   help="also record every image's bits/dim in nll.json")
    n.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="evaluate only the test images with id < N (>= 1; the same subset for any world "
                        "size). Default: all")
    n.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="network arithmetic: fp32 (TF32 off), tf32, bf16 (autocast) or fp64; auto = fp32 "
                        "with TF32 off on any device, as in every stage (Γ near t = N is ~1e-5 from 1, "
                        "below bf16/TF32 error); fp64 makes the result bit-stable across world sizes and "
                        "batch sizes; recorded as numeric_mode in nll.json (default: %(default)s)")
    n.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_convention_flags(n, ("covariance_fit", "nll_clip_x0", "even_rounding", "dp_cost", "decoder"))
    add_collective_timeout_flag(n)
    add_config_options(n)


def _fid_parser(sub) -> None:
    f = sub.add_parser("fid", help="FID of a sample folder against reference shards",
                       description="FID (Inception-v3 pool3, 2048-d) of the samples against the reference "
                                   "set; sample folders are checked against their manifest first.")
    f.add_argument("--samples", required=True,
                   help="sample folder written by adpm_dist.sample (its samples-*.tar), or shard URLs")
    f.add_argument("--reference", required=True,
                   help="reference shards, e.g. the test split; its statistics are cached beside them")
    f.add_argument("--out", default=None, help="also write the result JSON here (a rerun is then a no-op)")
    f.add_argument("--batch-size", type=positive_int, default=50, metavar="B",
                   help="images per Inception call (>= 1). Default: %(default)s")
    f.add_argument("--num-workers", type=nonnegative_int, default=1, help=WORKERS_HELP)
    f.add_argument("--precision", default="auto", choices=FID_PRECISIONS,
                   help="Inception arithmetic: fp32 (TF32 off), tf32 or bf16 (autocast); auto = fp32 with "
                        "TF32 off, as in every stage. A mode other than fp32 gets its own reference cache; "
                        "recorded as numeric_mode in the result (default: %(default)s)")
    add_collective_timeout_flag(f)
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_options(f)


def build_parser() -> ConfigParser:
    p = ConfigParser(prog="adpm_dist.evaluate",
               description="Evaluation tables: nll (negative ELBO, bits/dim) and fid (Fréchet Inception "
                           "distance). One process or under torchrun.")
    sub = p.add_subparsers(dest="command", required=True)
    _nll_parser(sub)
    _fid_parser(sub)
    return p
