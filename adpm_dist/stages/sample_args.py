"""The flags of ``python -m adpm_dist.sample``: what each does, its default and unit, and which
methods it applies to; every number is checked when parsed (one ``error:`` line, exit 2)."""

from __future__ import annotations

from adpm_dist.diffusion.analytic import DDPM_FAMILY, METHODS
from adpm_dist.diffusion.noise import DEFAULT_NOISE_STREAM, NOISE_STREAMS
from adpm_dist.diffusion.trajectory import TRAJECTORIES
from adpm_dist.errors import UsageError, fraction, int_at_least, nonnegative_int, positive_float, positive_int
from adpm_dist.models.loading import PRECISIONS
from adpm_dist.stages.config_args import ConfigParser, add_config_options
from adpm_dist.stages.conventions import add_convention_flags
from adpm_dist.stages.job import add_collective_timeout_flag

METHOD_HELP = ("reverse-step variance rule: ddpm-beta (σ² = β), ddpm-tilde (σ² = β̃), ddim (η-DDIM, "
               "σ² = η²β̃), analytic-ddpm / analytic-ddim (the analytic optimal σ² from Γ; need --gamma), "
               "residual-ddpm / residual-ddim (the KL-optimal σ² for this model's own error; need a "
               "--gamma file with the model-error moments)")
TRAJECTORY_HELP = ("which K of the N timesteps to visit: even (evenly spaced), quadratic (dense near "
                   "t = 1), optimal (least-KL path by dynamic programming over Γ; needs --gamma). "
                   "Default: %(default)s")
CLIP_HELP = ("cap σ² of the last step (into τ_1) so that its noise stays within about Y pixel "
             "levels of 0..255 (the paper's §6 clip; every method, a no-op for ddim at η = 0). "
             "Must be > 0; default: no cap")
ETA_HELP = ("DDIM η in [0, 1] (ddim, analytic-ddim, residual-ddim only): σ² = η²β̃ + …; 0 = "
            "deterministic DDIM. The DDPM family (ddpm-beta, ddpm-tilde, analytic-ddpm, residual-ddpm) "
            "has no η: nonzero is refused. "
            "Default: %(default)s")
PRECISION_HELP = ("arithmetic of the network: auto (= fp32 with TF32 off, on any device, as in every stage), "
                  "fp32, tf32, bf16 (autocast; faster on a GPU), or fp64 (slow; makes the images independent "
                  "of --batch-size); recorded as numeric_mode in manifest.json. Default: %(default)s")


def check_eta(method: str, eta: float) -> None:
    """η belongs to the DDIM family; for a DDPM-family method it would be silently ignored."""
    if eta != 0 and method in DDPM_FAMILY:
        raise UsageError(f"--eta {eta:g}: --method {method} has no η (it applies to ddim, "
                         "analytic-ddim and residual-ddim only); drop --eta")


def build_parser() -> ConfigParser:
    p = ConfigParser(prog="adpm_dist.sample",
               description="Draw --num-samples images with a reverse-diffusion sampler into WebDataset "
                           "shards under --out (resumable; rerunning a finished job is a no-op).")
    p.add_argument("--checkpoint", required=True,
                   help="the ε-network: a training run folder, a .safetensors weights file, or "
                        "diffusers:PATH")
    p.add_argument("--gamma", default=None, metavar="G.json",
                   help="Γ file estimated for this very model (adpm_dist.estimate); needed by analytic-* "
                        "methods and --trajectory optimal, ignored otherwise")
    p.add_argument("--method", required=True, choices=METHODS, help=METHOD_HELP)
    p.add_argument("--steps", type=int_at_least(2), required=True, metavar="K",
                   help="number of reverse steps K, 2 <= K <= N (the checkpoint's timesteps)")
    p.add_argument("--trajectory", default="even", choices=TRAJECTORIES, help=TRAJECTORY_HELP)
    p.add_argument("--num-samples", type=positive_int, required=True, metavar="N",
                   help="number of images to draw (>= 1)")
    p.add_argument("--out", required=True,
                   help="output folder: local path, file:// or s3:// (owned by this job: another job "
                        "writing there is refused)")
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="B",
                   help="images per network call, per process (>= 1; memory only, not part of the job). "
                        "Default: %(default)s")
    p.add_argument("--shard-size", type=positive_int, default=1000, metavar="M",
                   help="images per output .tar shard (>= 1), the unit of resume (part of the job). "
                        "Default: %(default)s")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="image i is drawn from its own seed SEED + i (>= 0). "
                        "Default: %(default)s")
    p.add_argument("--eta", type=fraction, default=0.0, help=ETA_HELP)
    p.add_argument("--clip-pixel", type=positive_float, default=None, metavar="Y", help=CLIP_HELP)
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--noise-stream", type=int, default=DEFAULT_NOISE_STREAM, choices=NOISE_STREAMS,
                   help="how image i's noise is drawn from its seed: 2 = one counter-based draw per batch "
                        "and step (adpm_dist.diffusion.noise), 1 = a torch generator per image, as before "
                        "2026-12 (to reproduce older images); part of the job. Default: %(default)s")
    p.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (off by default; slow to start on CPU; "
                        "not part of the job)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_convention_flags(p, ("covariance_fit", "ddim_direction", "even_rounding", "dp_cost"))
    add_collective_timeout_flag(p)
    add_config_options(p)
    return p
