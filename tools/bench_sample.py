#!/usr/bin/env python
"""Benchmark the sampling job on this machine; prints one JSON object.

- ``ratio_vs_bare_forward``: images/s of the whole job (``adpm_dist.stages.sample``: noise,
  reverse steps, PNG encoding, shard writes) ÷ images/s of a bare loop of K forward passes of
  the same model at the same batch size (goal ≥ 0.95; issue 22), per method, with noise stream 2
  (the default: one counter-based draw per batch and step); ``ddpm-tilde/stream1`` is the same
  method with stream 1 (a generator per image), for comparison; ``cpu_time_ratio_vs_bare_forward``:
  the same with process CPU time (on a shared CPU box the wall-time ratio measures the neighbours);
- ``peak_rss_mib``: peak memory of the job (its own process) for ``--small`` and
  ``--large`` samples: shards are streamed out, never held, so this should stay flat.

    python tools/bench_sample.py [--model tiny|mnist|cifar10] [--steps 10] [--batch-size 256] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RSS_SNIPPET = (
    "import sys, resource; from adpm_dist import sample; rc = sample.main(sys.argv[1:]); "
    "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
)


def save_model(work: str, name: str, num_timesteps: int) -> str:
    from adpm_dist.models import build_model
    from adpm_dist.models.io import save_model as save

    torch.manual_seed(0)
    model = build_model(name)
    path = os.path.join(work, f"{name}.safetensors")
    save(model, path, {"schedule": {"name": "linear", "num_timesteps": num_timesteps}})
    return path


def bare_images_per_s(model_path: str, steps: int, batch: int, repeats: int, precision: str,
                      compile_it: bool = False) -> float:
    """K forward passes per batch, nothing else: the floor any sampler stands on."""
    from adpm_dist.io import dist
    from adpm_dist.models.loading import eps_function, load_checkpoint
    from adpm_dist.stages.sample import image_shape

    loaded = load_checkpoint(model_path)
    device = dist.device_for(dist.env_info())
    eps = eps_function(torch.compile(loaded.model) if compile_it else loaded.model, device, precision)
    x = torch.randn(batch, *image_shape(loaded.model), device=device)
    n = torch.full((batch,), loaded.schedule.num_timesteps // 2, dtype=torch.long, device=device)
    eps(x, n)  # warm-up
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for _ in range(steps):
            out = eps(x, n)
    _sync(device)
    del out
    return repeats * batch / (time.perf_counter() - start), repeats * batch / (time.process_time() - cpu)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def job_images_per_s(model_path, out, method, steps, batch, batches, precision, extra=()) -> float:
    """The job in-process, timed end to end (one shard per batch; warm-up batch excluded)."""
    from adpm_dist.stages import sample

    common = ["--checkpoint", model_path, "--method", method, "--steps", str(steps),
              "--batch-size", str(batch), "--shard-size", str(batch), "--precision", precision,
              "--no-progress", *extra]
    sample.main([*common, "--num-samples", str(batch), "--out", out + "-warm"])
    start, cpu = time.perf_counter(), time.process_time()
    rc = sample.main([*common, "--num-samples", str(batch * batches), "--out", out])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if rc != 0:
        raise SystemExit(f"sampling job failed ({rc})")
    return batch * batches / wall, batch * batches / cpu


def peak_rss_mib(model_path, out, num, steps, batch) -> float:
    argv = ["--checkpoint", model_path, "--method", "ddim", "--steps", str(steps), "--num-samples", str(num),
            "--out", out, "--batch-size", str(batch), "--shard-size", "1000", "--no-progress"]
    res = subprocess.run([sys.executable, "-c", RSS_SNIPPET, *argv], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    kib = next(int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("MAXRSS_KIB"))
    return kib / 1024


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="preset: tiny (8×8), mnist, cifar10, …")
    p.add_argument("--num-timesteps", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=8, help="timed batches per job run")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs (shared machines)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--large", type=int, default=10000)
    p.add_argument("--rss-batch-size", type=int, default=256)
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--compile", action="store_true", help="the job and the bare loop with torch.compile")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from adpm_dist.gamma import GammaFile, write_gamma
    from adpm_dist.io import dist

    with tempfile.TemporaryDirectory() as work:
        model = save_model(work, args.model, args.num_timesteps)
        from adpm_dist.models.loading import load_checkpoint

        loaded = load_checkpoint(model)
        gf = GammaFile.empty(loaded.schedule, loaded.describe())  # any valid Γ: cost is what we measure
        n_t = loaded.schedule.num_timesteps
        gf.add(list(range(1, n_t + 1)) * 2, [0.5] * (2 * n_t))
        gamma = os.path.join(work, "gamma.json")
        write_gamma(gf, gamma)

        # Best of --repeats for both sides: a shared machine only ever makes a run slower.
        bare = bare_cpu = 0.0
        methods, cpu_rates = {}, {}
        for rep in range(args.repeats):
            wall_ips, cpu_ips = bare_images_per_s(model, args.steps, args.batch_size, args.batches,
                                                  args.precision, args.compile)
            bare, bare_cpu = max(bare, wall_ips), max(bare_cpu, cpu_ips)
            comp = ("--compile",) if args.compile else ()
            runs = (("ddim", ()), ("ddpm-tilde", ()), ("analytic-ddpm", ("--gamma", gamma)),
                    ("analytic-ddim", ("--gamma", gamma)), ("ddpm-tilde/stream1", ("--noise-stream", "1")))
            for name, extra in runs:
                out = os.path.join(work, f"{name.replace('/', '-')}-{rep}")
                ips, cpu_ips = job_images_per_s(model, out, name.split("/")[0], args.steps, args.batch_size,
                                                args.batches, args.precision, (*extra, *comp))
                methods[name] = max(methods.get(name, 0.0), ips)
                cpu_rates[name] = max(cpu_rates.get(name, 0.0), cpu_ips)
        methods = {m: {"images_per_s": round(ips, 2), "ratio_vs_bare_forward": round(ips / bare, 3),
                       "cpu_time_ratio_vs_bare_forward": round(cpu_rates[m] / bare_cpu, 3)}
                   for m, ips in methods.items()}
        rss = {}
        if not args.skip_rss:
            for num in (args.small, args.large):
                rss[str(num)] = round(peak_rss_mib(model, os.path.join(work, f"rss{num}"), num, args.steps,
                                                   args.rss_batch_size), 1)
        device = dist.device_for(dist.env_info())
        result = {
            "model": args.model,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
            "torch_threads": torch.get_num_threads(), "steps": args.steps, "batch_size": args.batch_size,
            "precision": args.precision, "repeats": args.repeats,
            "bare_forward_images_per_s": round(bare, 2), "methods": methods,
            "compile": args.compile,
            "min_ratio_vs_bare_forward": min(m["ratio_vs_bare_forward"] for k, m in methods.items()
                                             if "/" not in k),
            "min_cpu_time_ratio_vs_bare_forward": min(m["cpu_time_ratio_vs_bare_forward"]
                                                      for k, m in methods.items() if "/" not in k),
            "peak_rss_mib": rss,
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
