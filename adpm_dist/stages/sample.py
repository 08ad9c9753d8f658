"""Batched sampling to WebDataset shards: ``python -m adpm_dist.sample`` (or under torchrun).

    python -m adpm_dist.sample --checkpoint RUN_OR_WEIGHTS [--gamma G.json] \
        --method analytic-ddim --steps 10 --trajectory even|quadratic|optimal \
        --num-samples 50000 --out s3://bucket/samples/run1 [--batch-size B] [--seed S] \
        [--eta E] [--clip-pixel Y] [--shard-size M] [--precision auto|fp32|fp64|bf16]

(flags: :mod:`adpm_dist.stages.sample_args`). Image i (global index 0..num-samples−1)
is drawn from its own seed ``seed + i`` (noise stream 2, :class:`noise.CounterNoise`: one draw
per batch and step; 1: a generator per image), so no image depends on which rank drew it. Shards of
``--shard-size`` images: shard j goes to rank j mod W and is drawn in batches
[jM + bB, jM + (b+1)B) — the same batches for every world size, hence byte-identical
output for any W on CPU (for any batch size too with ``--precision fp64``, whose
kernels do not depend on the batch's other members).

Each shard is written atomically (visible only when complete) and streamed out
as soon as it is drawn: memory does not grow with ``--num-samples``. A rerun
skips the shards that exist, so an interrupted job completes without gaps or
duplicates; ``manifest.json`` (written last, by rank 0, after ``config.json``, the options
of the run that finished it) marks the job finished, and rerunning a finished job is a
no-op. The job owns ``--out``: it claims the folder (:func:`storage.claim`) before writing
``job.json``, which pins what determines the images, so another job started into the same
folder — even at the same moment — is refused rather than mixed in. Where the model and Γ
file were read from is recorded but not compared (their digests are): ``g.json`` and
``/abs/g.json`` are one job.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import sys
import tarfile
import time

import numpy as np
import torch

from adpm_dist.diffusion.analytic import ANALYTIC_METHODS
from adpm_dist.diffusion.conventions import OURS, Conventions
from adpm_dist.diffusion.noise import CounterNoise
from adpm_dist.diffusion.samplers import make_generators, run_reverse
from adpm_dist.errors import UsageError
from adpm_dist.gamma import load_for
from adpm_dist.io import dist, storage
from adpm_dist.io.shards import MANIFEST_NAME, encode_png, write_manifest, write_shard
from adpm_dist.models.compile import maybe_compiled
from adpm_dist.models.loading import (
    CheckpointError,
    LoadedModel,
    eps_function,
    load_checkpoint,
    numeric_mode,
    resolve_precision,
)
from adpm_dist.stages.config_args import resolved_config
from adpm_dist.stages.conventions import (
    LEGACY,
    conventions_from,
    relevant,
    trajectory_options,
    variance_options,
)
from adpm_dist.stages.job import ShardedJob, job_main, resolve_trajectory, resolve_variances
from adpm_dist.stages.sample_args import build_parser, check_eta
from adpm_dist.train.grid import upscale_factor

SPLIT = "samples"
JOB_NAME = "job.json"
GRID_NAME = "grid.png"
CONFIG_NAME = "config.json"  # the resolved options (config_args.resolved_config)
GRID_COUNT = 64


# ---------------------------------------------------------------------------- pieces


def image_shape(model: torch.nn.Module) -> tuple[int, ...]:
    """(C, H, W) of the model's data: the oracle carries ``shape``; UNets their config."""
    if getattr(model, "shape", None) is not None:
        return tuple(int(s) for s in model.shape)
    cfg = getattr(model, "config", {})
    try:
        return (int(cfg["in_channels"]), int(cfg["resolution"]), int(cfg["resolution"]))
    except KeyError:
        raise CheckpointError("cannot tell the image shape: the model config lacks "
                              "in_channels/resolution") from None


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[−1, 1] float (B, C, H, W) → uint8 (B, H, W, C) on the grid the data loader inverts (x/127.5 − 1)."""
    pixels = torch.round((x.to(torch.float64).clamp(-1, 1) + 1.0) * 127.5).clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def shard_name(j: int) -> str:
    return f"{SPLIT}-{j:06d}.tar"


def shard_span(j: int, shard_size: int, num_samples: int) -> tuple[int, int]:
    return j * shard_size, min((j + 1) * shard_size, num_samples)


def draw_shard(sampler, j: int, args, meta: dict) -> list[dict]:
    """The samples (key, png, json) of shard j, drawn batch by batch."""
    lo, hi = shard_span(j, args.shard_size, args.num_samples)
    out = []
    for b in range(lo, hi, args.batch_size):
        idx = list(range(b, min(b + args.batch_size, hi)))
        pixels = to_uint8(sampler([args.seed + i for i in idx]))
        for i, arr in zip(idx, pixels):
            record = {"index": i, "seed": args.seed + i, **meta}
            out.append({"__key__": f"{SPLIT}_{i:08d}", "png": encode_png(arr),
                        "json": json.dumps(record, sort_keys=True)})
    return out


def shard_entry(url: str, j: int, args) -> dict:
    """Manifest entry of an existing shard (hash read back: it may come from an earlier run)."""
    lo, hi = shard_span(j, args.shard_size, args.num_samples)
    sha = hashlib.sha256()
    nbytes = 0
    with storage.open_read(url) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            nbytes += len(chunk)
    return {"name": shard_name(j), "split": SPLIT, "offset": lo, "count": hi - lo,
            "sha256": sha.hexdigest(), "bytes": nbytes}


def read_first_images(out: str, count: int) -> list[np.ndarray]:
    """The first ``count`` images in index order, read back from the shards."""
    from adpm_dist.io.shards import decode_png

    images: list[np.ndarray] = []
    j = 0
    while len(images) < count:
        url = storage.join(out, shard_name(j))
        if not storage.exists(url):
            break
        with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if member.name.endswith(".png") and len(images) < count:
                    images.append(decode_png(tar.extractfile(member).read(), None))
        j += 1
    return images


def make_grid(images: list[np.ndarray], columns: int = 8, pad: int = 2) -> bytes:
    """PNG of the images in a grid (row-major, index order), ``pad`` pixels of black between.

    Small images are enlarged nearest-neighbour by a whole factor (each at least
    ``MIN_IMAGE_PX`` wide, :func:`adpm_dist.train.grid.upscale_factor`), as training's grids are.
    """
    from PIL import Image

    k = upscale_factor(images[0].shape[1])
    images = [img.repeat(k, axis=0).repeat(k, axis=1) for img in images]
    h, w, c = images[0].shape
    rows = math.ceil(len(images) / columns)
    canvas = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, columns)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        canvas[top: top + h, left: left + w] = img
    buf = io.BytesIO()
    Image.fromarray(canvas[:, :, 0] if c == 1 else canvas).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- the job


def job_description(args, loaded: LoadedModel, tau: np.ndarray, gamma_digest: str | None,
                    shape: tuple[int, ...], conventions: dict) -> dict:
    """What determines the images, as job.json records it (world/batch size excluded);
    ``conventions``: the official-code switches that change these images."""
    gamma_source = storage.redact(storage.canonical(args.gamma)) if args.gamma else None
    return {
        "format": "adpm-samples/1",
        "model": loaded.describe(), "schedule": loaded.schedule.describe(),
        "gamma": {"source": gamma_source, "sha256": gamma_digest} if args.gamma else None,
        "method": args.method, "steps": args.steps, "trajectory": args.trajectory,
        "tau": [int(t) for t in tau], "eta": args.eta, "clip_pixel": args.clip_pixel,
        "seed": args.seed, "num_samples": args.num_samples, "shard_size": args.shard_size,
        "precision": args.precision, "shape": list(shape), "conventions": conventions,
        "noise_stream": args.noise_stream,
    }


def job_identity(job: dict) -> dict:
    """The job less where its model and Γ file were read from: their digests determine the
    images, so ``g.json`` and ``/abs/g.json`` (or a moved checkpoint) are the same job."""
    model, gamma = job.get("model"), job.get("gamma")
    ident = {"noise_stream": 1, **job}  # written before noise stream 2: drawn with stream 1
    if "conventions" not in ident:  # written before the switches: made with the legacy choices
        ident["conventions"] = relevant(Conventions(**{**OURS.describe(), **LEGACY}),
                                        str(job.get("method")), str(job.get("trajectory")))
    if isinstance(model, dict):
        ident["model"] = {k: v for k, v in model.items() if k != "source"}
    if isinstance(gamma, dict):
        ident["gamma"] = {"sha256": gamma.get("sha256")}
    return ident


def job_owner(job: dict) -> str:
    """The claim owner of ``job`` (io.storage.claim): a digest of its identity."""
    return hashlib.sha256(json.dumps(job_identity(job), sort_keys=True).encode()).hexdigest()[:32]


def read_job(out: str) -> dict | None:
    """OUT/job.json, or None when there is none."""
    url = storage.join(out, JOB_NAME)
    if not storage.exists(url):
        return None
    return storage.read_json_object(url, UsageError, "; remove it to start over")


def check_same_job(out: str, stored: dict | None, job: dict) -> None:
    """Refuse ``out`` unless its job.json describes ``job`` (identities compared)."""
    if stored is None:
        raise UsageError(f"{storage.redact(out)} holds a finished shard set but no {JOB_NAME}: not the "
                         "output of adpm_dist.sample; choose another --out")
    old, new = job_identity(stored), job_identity(job)
    if old != new:
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise UsageError(f"{storage.redact(out)} holds samples of a different job (differs in "
                         f"{', '.join(keys)}); choose another --out or remove it")


def claim_output(out: str, job: dict) -> dict:
    """Own ``out`` for ``job`` (refusing another job's prefix); returns the job.json in force.

    A folder written before claims existed holds no claim: it is accepted when its job.json
    describes this job, and refused (our fresh claim given back) when it does not.
    """
    note = f"sample {job['method']} K={job['steps']} seed {job['seed']}, {job['num_samples']} images"
    mine = storage.claim(out, job_owner(job), note)
    try:
        stored = read_job(out)
        if stored is None:
            storage.write_text(storage.join(out, JOB_NAME), json.dumps(job, indent=1, sort_keys=True) + "\n")
            return job
        check_same_job(out, stored, job)
        return stored
    except BaseException:
        storage.release(mine)
        raise


def remove_stale_temporaries(out: str) -> None:
    """Temporary files of shard writers killed mid-write (local storage; S3 aborts its uploads).

    Called by rank 0 before any rank starts writing, so no live writer's file is touched.
    """
    if storage.is_remote(out) or not storage.exists(out):
        return
    for path in glob.glob(os.path.join(storage.local_path(out), f".{SPLIT}-*.tar.*.tmp")):
        os.unlink(path)


def _report_mode(args, ref) -> None:
    """Warn when this run's numeric mode differs from the one Γ was estimated in (``auto`` is
    fp32 here as in the Γ job, so a default run pairs with a default Γ file silently)."""
    warning = ref.mode_warning(resolve_precision(args.precision, dist.device_for(dist.env_info())))
    if warning:
        print(warning, file=sys.stderr)


class SampleJob(ShardedJob):
    """Shards of images on the job core: shard j on rank j mod W, one shard per rank per round."""

    label = "sampling (images)"

    def __init__(self, args, rank: int, world: int):
        check_eta(args.method, args.eta)
        self.args, self.rank, self.world = args, rank, world
        self.loaded = loaded = load_checkpoint(args.checkpoint)
        if args.method in ANALYTIC_METHODS and args.gamma is None:
            raise UsageError(f"--method {args.method} needs --gamma (a Γ file for this model)")
        ref = load_for(loaded, args.gamma) if args.gamma else None
        if ref is not None and rank == 0:
            _report_mode(args, ref)
        gamma, gamma_digest = (ref.gamma, ref.sha256) if ref else (None, None)
        self.conventions = conv = conventions_from(args)
        tau = resolve_trajectory(args.trajectory, loaded.schedule, args.steps, gamma,
                                 **trajectory_options(conv, args.method, args.trajectory, ref))
        self.steps = resolve_variances(loaded.schedule, tau, args.method, gamma, args.eta, args.clip_pixel,
                                       **variance_options(conv, args.method, ref))
        self.shape = image_shape(loaded.model)
        self.job = job_description(args, loaded, tau, gamma_digest, self.shape,
                                   relevant(conv, args.method, args.trajectory))
        self.meta = {"method": args.method, "steps": args.steps, "trajectory": args.trajectory,
                     "tau_sha256": hashlib.sha256(json.dumps(self.job["tau"]).encode()).hexdigest(),
                     "eta": args.eta, "clip_pixel": args.clip_pixel,
                     "model_digest": loaded.digest, "gamma_sha256": gamma_digest}
        self.num_shards = math.ceil(args.num_samples / args.shard_size)
        self.rounds = math.ceil(self.num_shards / world)
        self.show_progress, self.progress_total = not args.no_progress, args.num_samples
        self.entries: list[dict] = []
        self.present: set[int] | None = None
        self.drawn = self.local_done = 0

    def existing(self) -> bool:
        """Rank 0: a finished folder is compared only (a no-op rerun writes nothing); otherwise
        the job claims the folder first, so two jobs never write into one."""
        out = self.args.out
        if storage.exists(storage.join(out, MANIFEST_NAME)):
            self.record = read_job(out)
            check_same_job(out, self.record, self.job)
            return True
        self.record = claim_output(out, self.job)
        remove_stale_temporaries(out)
        return False

    def done_message(self) -> str:
        return f"{storage.redact(self.args.out)}: already complete, nothing to do"

    def _span(self, j: int) -> int:
        lo, hi = shard_span(j, self.args.shard_size, self.args.num_samples)
        return hi - lo

    def _open(self) -> None:
        args, device = self.args, dist.device_for(dist.env_info())
        eps_fn = eps_function(maybe_compiled(self.loaded.model, args.compile), device, args.precision)
        dtype = torch.float64 if args.precision == "fp64" else torch.float32

        def sampler(seeds: list[int]) -> torch.Tensor:
            # stream 2: one counter-based draw per batch and step; 1: a generator per image
            gens = CounterNoise(seeds) if args.noise_stream == 2 else make_generators(seeds, device=device)
            return run_reverse(eps_fn, self.loaded.schedule, self.steps, gens, self.shape, dtype=dtype,
                               device=device, direction=self.conventions.ddim_direction,
                               zero_noise=self.conventions.zero_noise)

        self.sampler = sampler
        mine = range(self.rank, self.num_shards, self.world)
        self.present = {j for j in mine if storage.exists(storage.join(args.out, shard_name(j)))}
        self.local_done = sum(self._span(j) for j in self.present)
        self.start = time.time()

    def step(self, round_index: int) -> bool:
        if self.present is None:
            self._open()
        args, j = self.args, round_index * self.world + self.rank
        if j < self.num_shards:
            url = storage.join(args.out, shard_name(j))
            if j in self.present:
                self.entries.append(shard_entry(url, j, args))
            else:
                result = write_shard(url, draw_shard(self.sampler, j, args, self.meta))
                lo, hi = shard_span(j, args.shard_size, args.num_samples)
                self.entries.append({"name": shard_name(j), "split": SPLIT, "offset": lo, "count": hi - lo,
                                     "sha256": result["sha256"], "bytes": result["bytes"]})
                self.drawn += hi - lo
                self.local_done += hi - lo
        return round_index + 1 < self.rounds

    def reduce(self, rounds: int) -> tuple[int, bool]:
        done = dist.all_reduce_sum(torch.tensor([float(self.local_done)], dtype=torch.float64))
        return int(done[0]), False

    def payload(self):
        self.wall = time.time() - self.start
        return {"entries": self.entries, "drawn": self.drawn}

    def write(self, gathered: list) -> None:
        args, shape = self.args, self.shape
        entries = sorted((e for g in gathered for e in g["entries"]), key=lambda e: e["offset"])
        drawn = sum(g["drawn"] for g in gathered)
        grid = read_first_images(args.out, min(GRID_COUNT, args.num_samples))
        storage.write_bytes(storage.join(args.out, GRID_NAME), make_grid(grid))
        # The options of the run that finished the job, beside it (the manifest holds the job only).
        storage.write_text(storage.join(args.out, CONFIG_NAME), json.dumps(resolved_config(args)) + "\n")
        device = dist.device_for(dist.env_info())  # the arithmetic of the run that finished the job
        mode = numeric_mode(resolve_precision(args.precision, device), device)
        write_manifest(args.out, {"resolution": shape[-1], "channels": shape[0], "shards": entries,
                                  "splits": {SPLIT: args.num_samples}, "job": self.record,
                                  "numeric_mode": mode})
        print(json.dumps({"out": storage.redact(args.out), "num_samples": args.num_samples,
                          "drawn_now": drawn, "shards": len(entries), "wall_time_s": round(self.wall, 3),
                          "images_per_s": round(drawn / max(self.wall, 1e-9), 2)}))


def check_argv(argv: list[str]) -> None:
    """The command line's user errors, without reading the checkpoint or Γ (launch calls it)."""
    args = build_parser().parse_args(argv)
    check_eta(args.method, args.eta)


def main(argv: list[str] | None = None) -> int:
    return job_main(SampleJob, build_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
