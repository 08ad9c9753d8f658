"""Benchmark: diffusers DDIMPipeline with its own DDIMScheduler vs with AnalyticDPMScheduler.

Same model, same batch, K steps (default 10), runs interleaved so drift hits both alike;
reports images/s of each (median over repeats) and the ratio ours/theirs (goal ≥ 0.95),
as JSON on stdout and optionally to --out (written atomically).

The model is a diffusers folder (--model) or, by default, a random UNet2DModel of the
given size. Γ only changes the variances, not the cost, so without --gamma a constant
Γ = 0.5 is used (speed only; say so in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: a random UNet2DModel)")
    p.add_argument("--gamma", default=None, help="Γ file for the model (default: constant 0.5)")
    p.add_argument("--size", type=int, default=32, help="image size of the random UNet")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--method", default="analytic-ddim", help="our scheduler's method")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the JSON here too")
    return p.parse_args(argv)


def random_model(size: int, channels: int):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(32, 64, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return unet.eval(), DDPMScheduler(num_train_timesteps=1000)


def our_scheduler(cfg: dict, gamma_file: str | None, method: str):
    """AnalyticDPMScheduler from a Γ file, or with Γ = 0.5 everywhere (timing only)."""
    from adpm_dist.gamma import read_gamma
    from adpm_dist.integrations.diffusers.scheduler import AnalyticDPMScheduler

    if gamma_file:
        return AnalyticDPMScheduler.from_gamma_file(read_gamma(gamma_file), cfg, method=method)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    return AnalyticDPMScheduler(**{k: cfg[k] for k in keys if k in cfg},
                                gamma=[0.5] * cfg["num_train_timesteps"], method=method)


def main(argv: list[str] | None = None) -> int:
    from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel

    args = parse_args(argv)
    if args.model:
        unet = UNet2DModel.from_pretrained(args.model, subfolder="unet").eval()
        base = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    else:
        unet, base = random_model(args.size, args.channels)
    ours = our_scheduler(dict(base.config), args.gamma, args.method)
    pipe = DDIMPipeline(unet=unet, scheduler=base).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe.scheduler  # DDIMPipeline turned it into a DDIMScheduler

    def run(sched) -> float:
        pipe.scheduler = sched
        gen = torch.Generator(device=args.device).manual_seed(0)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(batch_size=args.batch_size, generator=gen, num_inference_steps=args.steps, eta=0.0,
             output_type="np")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return args.batch_size / (time.perf_counter() - t0)

    run(theirs), run(ours)  # warm up
    rates: dict[str, list[float]] = {"ddim": [], "ours": []}
    for _ in range(args.repeats):
        rates["ddim"].append(run(theirs))
        rates["ours"].append(run(ours))
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "bench": "diffusers DDIMPipeline: DDIMScheduler vs AnalyticDPMScheduler",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch_threads": torch.get_num_threads(),
        "model": args.model or f"random UNet2DModel {args.channels}x{args.size}x{args.size}",
        "gamma": args.gamma or "constant 0.5 (speed only)",
        "method": args.method, "steps": args.steps, "batch_size": args.batch_size,
        "repeats": args.repeats,
        "images_per_s_ddim": med["ddim"], "images_per_s_ours": med["ours"],
        "ratio_ours_over_ddim": med["ours"] / med["ddim"],
        "all_images_per_s": rates,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        d = os.path.dirname(os.path.abspath(args.out))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".bench-")
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
