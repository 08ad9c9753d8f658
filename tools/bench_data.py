"""Decoded images/s streamed from a local S3 server vs the same shards on local disk.

    python tools/bench_data.py [--source mnist] [--resolution 32] [--workers 2] [--passes 2]

Writes the shards once to a temporary folder, uploads the identical files to S3 (the
server in AWS_ENDPOINT_URL with --s3-url, else a fresh `tools/s3_local.sh` server that is
stopped afterwards), then times the evaluation stream (every sample decoded once per pass,
float tensors out) over each copy with the same number of DataLoader workers. Runs alternate
local/S3 (--repeats) and the medians are compared. Prints JSON
with both rates and their ratio (goal: S3 ≥ 0.8 × local).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load_make_shards():
    if "make_shards" in sys.modules:
        return sys.modules["make_shards"]
    spec = importlib.util.spec_from_file_location("make_shards", HERE / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_shards"] = module
    spec.loader.exec_module(module)
    return module


def _rate(urls: str, batch_size: int, workers: int, passes: int) -> tuple[float, int]:
    from adpm_dist.io import data

    images = 0
    start = time.perf_counter()
    for _ in range(passes):
        ev = data.eval_batches(urls, batch_size=batch_size, rank=0, world_size=1, num_workers=workers)
        for ids, x in ev:
            images += len(ids)
            assert x.dtype.is_floating_point
    return images / (time.perf_counter() - start), images


def _start_server(root: str) -> dict[str, str]:
    out = subprocess.run(
        ["bash", str(HERE / "s3_local.sh"), "start", root],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    env = {}
    for line in out.splitlines():
        if line.startswith("export "):
            k, v = line[len("export ") :].split("=", 1)
            env[k] = v
    return env


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="mnist")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--passes", type=int, default=2, help="passes over the data per run")
    p.add_argument("--repeats", type=int, default=3, help="alternating local/S3 runs")
    p.add_argument("--s3-url", default=None, help="s3://bucket/prefix on the configured server")
    p.add_argument("--json", default=None, help="also write the result to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)

    from adpm_dist.io import storage

    make_shards = _load_make_shards()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        local = os.path.join(tmp, "local")
        ms_args = [
            args.source,
            local,
            "--resolution",
            str(args.resolution),
            "--test-fraction",
            "0",
            "--shard-size",
            str(args.shard_size),
        ]
        if args.limit:
            ms_args += ["--limit", str(args.limit)]
        manifest = make_shards.main(ms_args)
        served = None
        saved_env = {
            k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        }
        try:
            if args.s3_url:
                s3 = args.s3_url.rstrip("/")
            else:
                served = os.path.join(tmp, "s3")
                os.makedirs(served)
                os.environ.update(_start_server(served))
                storage.clear_cache()
                storage.filesystem("s3://bench").mkdir("bench")
                s3 = "s3://bench/shards"
            storage.upload_dir(local, s3)
            # Alternate local and S3 runs: on a shared machine the load drifts, and
            # alternating puts both under the same conditions; report the medians.
            local_runs, s3_runs = [], []
            for _ in range(args.repeats):
                rate, n = _rate(f"{local}/train-*.tar", args.batch_size, args.workers, args.passes)
                local_runs.append(rate)
                rate, n_s3 = _rate(f"{s3}/train-*.tar", args.batch_size, args.workers, args.passes)
                s3_runs.append(rate)
            local_rate, s3_rate = statistics.median(local_runs), statistics.median(s3_runs)
        finally:
            if served is not None:
                subprocess.run(
                    ["bash", str(HERE / "s3_local.sh"), "stop", served],
                    check=False,
                    timeout=30,
                    capture_output=True,
                )
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                storage.clear_cache()
    assert n == n_s3
    result = {
        "source": manifest["source"],
        "resolution": manifest["resolution"],
        "channels": manifest["channels"],
        "images_per_pass": manifest["splits"]["train"]["total"],
        "passes": args.passes,
        "repeats": args.repeats,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "local_images_per_s": round(local_rate, 1),
        "s3_images_per_s": round(s3_rate, 1),
        "ratio": round(s3_rate / local_rate, 3),
        "local_runs": [round(r, 1) for r in local_runs],
        "s3_runs": [round(r, 1) for r in s3_runs],
        "goal_ratio": 0.8,
    }
    result["meets_goal"] = result["ratio"] >= 0.8
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        storage.write_text(args.json, text + "\n")
    return result


if __name__ == "__main__":
    main()
