#!/usr/bin/env python
"""Benchmark the Γ job on this machine; prints one JSON object.

- ``ratio_vs_bare_forward``: the job's (sample, t) evaluations/s ÷ a bare loop of
  the same model's forward passes at the same batch size (goal ≥ 0.9);
- ``factor_vs_reread_per_t``: ÷ the blog snippet's scheme, which re-reads and
  re-decodes the data for every timestep;
- ``peak_rss_mib``: peak memory of the job for 1× and 4× ``--samples-per-t``
  (it streams: state is O(N), so this should stay flat).

    python tools/bench_estimate.py [--model mnist] [--timesteps 40] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RSS_SNIPPET = (
    "import sys, resource; from adpm_dist import estimate; rc = estimate.main(sys.argv[1:]); "
    "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
)


def make_inputs(work: str, model_name: str, num_timesteps: int, limit: int):
    from adpm_dist.models import build_model
    from adpm_dist.models.io import save_model

    model = build_model(model_name)
    res = model.config.get("resolution", 8)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_shards.py"), "digits",
                    os.path.join(work, "shards"), "--resolution", str(res), "--limit", str(limit),
                    "--test-fraction", "0.5", "--shard-size", "50"], check=True, capture_output=True)
    path = os.path.join(work, "model.safetensors")
    save_model(model, path, {"schedule": {"name": "linear", "num_timesteps": num_timesteps}})
    return path, os.path.join(work, "shards", "test-*.tar"), model


def run_job(args, out, extra=()):
    from adpm_dist.gamma import read_gamma
    from adpm_dist.stages import estimate

    rc = estimate.main(["--checkpoint", args.ckpt, "--data", args.data, "--out", out, "--timesteps",
                        f"1-{args.timesteps}", "--batch-size", str(args.batch_size), "--num-workers",
                        str(args.num_workers), "--no-progress", *extra])
    assert rc == 0
    return read_gamma(out, require_complete=False)


def bare_forward(model, batch, shape, evaluations, num_timesteps) -> float:
    x = torch.randn(batch, *shape)
    n = torch.randint(1, num_timesteps + 1, (batch,))
    steps = max(1, evaluations // batch)
    with torch.inference_mode():
        model(x, n)
        start = time.perf_counter()
        for _ in range(steps):
            model(x, n)
    return steps * batch / (time.perf_counter() - start)


def reread_per_t(args, model, schedule) -> float:
    """The blog snippet: for every t, stream and decode the whole data set again."""
    from adpm_dist.diffusion.forward import q_sample
    from adpm_dist.io.data import eval_batches

    evals = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for t in range(1, args.timesteps + 1):
            for _, x in eval_batches(args.data, batch_size=args.batch_size, rank=0, world_size=1,
                                     num_workers=args.num_workers):
                n = torch.full((x.shape[0],), t)
                eps = model(q_sample(schedule, x, n, torch.randn_like(x)), n)
                evals += float(eps.shape[0])
    return evals / (time.perf_counter() - start)


def peak_rss(args, out, per_t) -> float:
    cmd = [sys.executable, "-c", RSS_SNIPPET, "--checkpoint", args.ckpt, "--data", args.data, "--out", out,
           "--timesteps", "1-4", "--samples-per-t", str(per_t), "--batch-size", str(args.batch_size),
           "--num-workers", "1", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    kib = [int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("MAXRSS_KIB")][0]
    return kib / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model preset (tiny: 8 px; mnist: 1.6M params, 28 px)")
    p.add_argument("--timesteps", type=int, default=64, help="timesteps 1..T to estimate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=0,
                   help="data workers (on a 2-core CPU box a worker competes with the model for cores)")
    p.add_argument("--num-timesteps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=160, help="digits used (half are the test split)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        args.ckpt, args.data, model = make_inputs(work, args.model, args.num_timesteps, args.samples)
        model.eval()
        from adpm_dist.diffusion.schedule import make_schedule

        shape = (model.config["in_channels"], model.config["resolution"], model.config["resolution"])
        jobs, bares, naives = [], [], []
        # Alternate the three measurements and take medians: this machine is shared and noisy.
        for i in range(args.repeats):
            gf = run_job(args, os.path.join(work, f"g{i}.json"))
            jobs.append(gf.extra["evaluations_per_s"])
            evals = int(gf.count.sum())
            bares.append(bare_forward(model, args.batch_size, shape, evals, args.num_timesteps))
            naives.append(reread_per_t(args, model, make_schedule("linear", args.num_timesteps)))
        job, bare, naive = (float(np.median(v)) for v in (jobs, bares, naives))
        rss1 = peak_rss(args, os.path.join(work, "m1.json"), args.samples // 2)
        rss4 = peak_rss(args, os.path.join(work, "m4.json"), 4 * (args.samples // 2))
    print(json.dumps({
        "benchmark": "estimate", "model": args.model, "batch_size": args.batch_size,
        "evaluations": evals, "num_workers": args.num_workers,
        "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
        "job_runs": [round(v, 1) for v in jobs], "bare_runs": [round(v, 1) for v in bares],
        "job_evals_per_s": round(job, 1), "bare_forward_evals_per_s": round(bare, 1),
        "ratio_vs_bare_forward": round(job / bare, 3),
        "reread_per_t_evals_per_s": round(naive, 1), "factor_vs_reread_per_t": round(job / naive, 2),
        "peak_rss_mib": {"1x": round(rss1, 1), "4x": round(rss4, 1)},
        "peak_rss_ratio_4x_vs_1x": round(rss4 / rss1, 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(np.asarray(sys.argv[1:]).tolist()))
