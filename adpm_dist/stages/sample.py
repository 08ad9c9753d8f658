"""Batched sampling to WebDataset shards: ``python -m adpm_dist.sample`` (or under torchrun).

    python -m adpm_dist.sample --checkpoint RUN_OR_WEIGHTS [--gamma G.json] \
        --method analytic-ddim --steps 10 --trajectory even|quadratic|optimal \
        --num-samples 50000 --out s3://bucket/samples/run1 [--batch-size B] [--seed S] \
        [--eta E] [--clip-pixel Y] [--shard-size M] [--precision auto|fp32|fp64|bf16]

Image i (global index 0..num-samples−1) is drawn from its own generator seeded
``seed + i`` (:func:`samplers.make_generators`), so an image never depends on
which rank drew it. Work is split into shards of ``--shard-size`` images; shard
j goes to rank j mod W and is drawn in batches [jM + bB, jM + (b+1)B) — the
same batches for every world size, hence byte-identical output for any W on
CPU (for any batch size too with ``--precision fp64``, whose kernels do not
depend on the batch's other members).

Each shard is written atomically (visible only when complete) and streamed out
as soon as it is drawn: memory does not grow with ``--num-samples``. A rerun
skips the shards that exist, so an interrupted job completes without gaps or
duplicates; ``manifest.json`` (written last, by rank 0) marks the job finished,
and rerunning a finished job is a no-op. ``job.json`` (written first) pins the
command so a rerun with different settings is refused rather than mixed in.
"""

from __future__ import annotations

import argparse
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

from adpm_dist.diffusion.analytic import ANALYTIC_METHODS, METHODS, step_variances
from adpm_dist.diffusion.samplers import make_generators, run_reverse
from adpm_dist.diffusion.trajectory import TRAJECTORIES, make_trajectory
from adpm_dist.gamma import GammaFileError, check_model, check_schedule, read_gamma
from adpm_dist.io import dist, storage
from adpm_dist.io.shards import MANIFEST_NAME, encode_png, write_manifest, write_shard
from adpm_dist.models.loading import PRECISIONS, CheckpointError, LoadedModel, eps_function, load_checkpoint

SPLIT = "samples"
JOB_NAME = "job.json"
GRID_NAME = "grid.png"
GRID_COUNT = 64


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adpm_dist.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, weights file, or diffusers:PATH")
    p.add_argument("--gamma", default=None, help="Γ file (needed by analytic-* and --trajectory optimal)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--steps", type=int, required=True, help="number of steps K, 2 <= K <= N")
    p.add_argument("--trajectory", default="even", choices=TRAJECTORIES)
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--out", required=True, help="output folder (local, file:// or s3://)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (the unit of resume)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM-family η")
    p.add_argument("--clip-pixel", type=float, default=None, metavar="Y",
                   help="cap the σ of the step into τ_1 so its noise stays ≲ Y pixel levels (every method)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on GPU, fp32 on CPU; fp64 for batch-size invariance")
    p.add_argument("--no-progress", action="store_true")
    return p


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


def load_gamma_for(spec: str | None, loaded: LoadedModel):
    """(Γ vector, sha256 of the file) checked against the model's schedule and digest; (None, None)."""
    if spec is None:
        return None, None
    gf = read_gamma(spec, require_complete=False)  # partial files: checked per trajectory
    check_schedule(gf, loaded.schedule, source=f"Γ file {spec}")
    check_model(gf, loaded.digest, loaded.name, source=f"Γ file {spec}")
    digest = hashlib.sha256(storage.read_bytes(spec)).hexdigest()
    return gf.gamma_vector(), digest


def resolve_trajectory(kind: str, loaded: LoadedModel, steps: int, gamma) -> np.ndarray:
    """τ for (kind, K), refusing K outside [2, N] with a message naming N."""
    n = loaded.schedule.num_timesteps
    if not 2 <= steps <= n:
        raise ValueError(f"--steps {steps}: need 2 <= K <= N = {n} (the checkpoint's timesteps)")
    if kind == "optimal" and gamma is None:
        raise ValueError("--trajectory optimal needs --gamma (a Γ file for this model)")
    return make_trajectory(kind, loaded.schedule, steps, gamma=gamma)


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
    """PNG of the images in a grid (row-major, index order), ``pad`` pixels of black between."""
    from PIL import Image

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


class _Progress:
    """Rich progress bar over images, rank 0 only (None elsewhere)."""

    def __new__(cls, enabled: bool, total: int, done: int):
        return super().__new__(cls) if enabled else None

    def __init__(self, enabled: bool, total: int, done: int):
        from rich.progress import Progress

        self.bar = Progress(transient=False)
        self.bar.start()
        self.task = self.bar.add_task("sampling (images)", total=total, completed=done)

    def update(self, completed: int) -> None:
        self.bar.update(self.task, completed=completed)

    def close(self) -> None:
        self.bar.stop()


# ---------------------------------------------------------------------------- the job


def job_description(args, loaded: LoadedModel, tau: np.ndarray, gamma_digest: str | None,
                    shape: tuple[int, ...]) -> dict:
    """What determines the images: a rerun must match it exactly (world/batch size excluded)."""
    return {
        "format": "adpm-samples/1",
        "model": loaded.describe(), "schedule": loaded.schedule.describe(),
        "gamma": {"source": storage.redact(args.gamma), "sha256": gamma_digest} if args.gamma else None,
        "method": args.method, "steps": args.steps, "trajectory": args.trajectory,
        "tau": [int(t) for t in tau], "eta": args.eta, "clip_pixel": args.clip_pixel,
        "seed": args.seed, "num_samples": args.num_samples, "shard_size": args.shard_size,
        "precision": args.precision, "shape": list(shape),
    }


def check_or_write_job(out: str, job: dict, rank: int) -> bool:
    """True when the job is already finished (manifest present and matching); refuses other jobs."""
    job_url, manifest_url = storage.join(out, JOB_NAME), storage.join(out, MANIFEST_NAME)
    if storage.exists(job_url):
        try:
            old = json.loads(storage.read_text(job_url))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{job_url}: not valid JSON ({exc}); remove it to start over") from None
        if old != job:
            keys = [k for k in sorted(set(old) | set(job)) if old.get(k) != job.get(k)]
            raise ValueError(f"{out} holds samples of a different job (differs in {', '.join(keys)}); "
                             "choose another --out or remove it")
        return storage.exists(manifest_url)
    if rank == 0:
        storage.write_text(job_url, json.dumps(job, indent=1, sort_keys=True) + "\n")
    return False


def remove_stale_temporaries(out: str) -> None:
    """Temporary files of shard writers killed mid-write (local storage; S3 aborts its uploads).

    Called by rank 0 before any rank starts writing, so no live writer's file is touched.
    """
    if storage.is_remote(out) or not storage.exists(out):
        return
    for path in glob.glob(os.path.join(storage.local_path(out), f".{SPLIT}-*.tar.*.tmp")):
        os.unlink(path)


def run(args) -> int:
    if args.num_samples < 1 or args.batch_size < 1 or args.shard_size < 1:
        raise ValueError("--num-samples, --batch-size and --shard-size must be >= 1")
    loaded = load_checkpoint(args.checkpoint)
    if args.method in ANALYTIC_METHODS and args.gamma is None:
        raise ValueError(f"--method {args.method} needs --gamma (a Γ file for this model)")
    gamma, gamma_digest = load_gamma_for(args.gamma, loaded)
    tau = resolve_trajectory(args.trajectory, loaded, args.steps, gamma)
    steps = step_variances(loaded.schedule, tau, args.method, gamma=gamma, eta=args.eta,
                           clip_pixel=args.clip_pixel)
    shape = image_shape(loaded.model)
    job = job_description(args, loaded, tau, gamma_digest, shape)

    info = dist.init()
    rank, world = info.rank, info.world_size
    # Rank 0 decides and tells the others, so a refusal never leaves ranks waiting on each other.
    verdict: tuple[bool, str | None] = (False, None)
    if rank == 0:
        try:
            verdict = (check_or_write_job(args.out, job, rank), None)
            if not verdict[0]:
                remove_stale_temporaries(args.out)
        except ValueError as exc:
            verdict = (False, str(exc))
    finished, error = dist.broadcast_object(verdict)
    if error or finished:
        if rank == 0 and finished:
            print(f"{storage.redact(args.out)}: already complete, nothing to do")
        dist.shutdown()
        if error:
            raise ValueError(error)
        return 0

    device = dist.device_for(info)
    eps_fn = eps_function(loaded.model, device, args.precision)
    dtype = torch.float64 if args.precision == "fp64" else torch.float32

    def sampler(seeds: list[int]) -> torch.Tensor:
        gens = make_generators(seeds, device=device)
        return run_reverse(eps_fn, loaded.schedule, steps, gens, shape, dtype=dtype, device=device)

    meta = {"method": args.method, "steps": args.steps, "trajectory": args.trajectory,
            "tau_sha256": hashlib.sha256(json.dumps(job["tau"]).encode()).hexdigest(),
            "eta": args.eta, "clip_pixel": args.clip_pixel,
            "model_digest": loaded.digest, "gamma_sha256": gamma_digest}
    num_shards = math.ceil(args.num_samples / args.shard_size)
    mine = list(range(rank, num_shards, world))
    present = {j for j in mine if storage.exists(storage.join(args.out, shard_name(j)))}
    done_images = dist.all_reduce_sum(torch.tensor(
        [float(sum(np.diff(shard_span(j, args.shard_size, args.num_samples))[0] for j in present))],
        dtype=torch.float64)).item()
    progress = _Progress(rank == 0 and not args.no_progress, args.num_samples, int(done_images))
    entries: list[dict] = []
    drawn = 0
    start = time.time()
    # Lock-step rounds of one shard per rank, so progress can be all-reduced after each.
    for r in range(math.ceil(num_shards / world)):
        j = r * world + rank
        new = 0
        if j < num_shards:
            url = storage.join(args.out, shard_name(j))
            if j in present:
                entries.append(shard_entry(url, j, args))
            else:
                samples = draw_shard(sampler, j, args, meta)
                result = write_shard(url, samples)
                lo, hi = shard_span(j, args.shard_size, args.num_samples)
                entries.append({"name": shard_name(j), "split": SPLIT, "offset": lo, "count": hi - lo,
                                "sha256": result["sha256"], "bytes": result["bytes"]})
                new = hi - lo
        drawn += new
        total_new = dist.all_reduce_sum(torch.tensor([float(new)], dtype=torch.float64)).item()
        done_images += total_new
        if progress:
            progress.update(int(done_images))
    wall = time.time() - start
    if progress:
        progress.close()

    all_entries = sorted((e for part in dist.all_gather_object(entries) for e in part),
                         key=lambda e: e["offset"])
    drawn_total = dist.all_reduce_sum(torch.tensor([float(drawn)], dtype=torch.float64)).item()
    if rank == 0:
        grid = read_first_images(args.out, min(GRID_COUNT, args.num_samples))
        storage.write_bytes(storage.join(args.out, GRID_NAME), make_grid(grid))
        write_manifest(args.out, {
            "resolution": shape[-1], "channels": shape[0], "shards": all_entries,
            "splits": {SPLIT: args.num_samples}, "job": job,
        })
        print(json.dumps({"out": storage.redact(args.out), "num_samples": args.num_samples,
                          "drawn_now": int(drawn_total), "shards": len(all_entries),
                          "wall_time_s": round(wall, 3),
                          "images_per_s": round(drawn_total / max(wall, 1e-9), 2)}))
    dist.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, GammaFileError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
