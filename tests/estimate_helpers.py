"""Shared set-up for the Γ-job tests: small real shards, a model with non-trivial output."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_digit_shards(out: str, limit: int = 600, shard_size: int = 40) -> str:
    """scikit-learn digits as 8×8 shards; returns the test split's brace pattern."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "digits", out,
                    "--shard-size", str(shard_size), "--test-fraction", "0.2", "--limit", str(limit)],
                   check=True, capture_output=True)
    n = len([f for f in os.listdir(out) if f.startswith("test-")]) if "://" not in out else None
    return f"{out}/test-{{000000..{n - 1:06d}}}.tar" if n else f"{out}/test-*.tar"


def save_tiny_model(path: str, num_timesteps: int = 20, seed: int = 0) -> None:
    """The tiny UNet with every weight random (DDPM's zero-init would output ε ≈ 0)."""
    from adpm_dist.io import storage
    from adpm_dist.models import build_model
    from adpm_dist.models.io import model_to_bytes

    torch.manual_seed(seed)
    model = build_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3 / p[0].numel() ** 0.5)
    meta = {"schedule": {"name": "linear", "num_timesteps": num_timesteps}}
    storage.write_bytes(path, model_to_bytes(model, meta))


def torchrun(nproc: int, module_args: list[str], env=None, timeout=300, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "adpm_dist.estimate",
           *module_args]
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(cmd, env=full_env, timeout=timeout, capture_output=True, text=True, **kw)


def launch_ranks(world: int, module: str, module_args: list[str], extra_env=None, timeout=120):
    """Start ``world`` ranks of ``python -m module`` directly (no torchrun agent to kill peers).

    Like ``srun`` without ``--kill-on-bad-exit``: each rank lives or dies on its own,
    so a rank left waiting for a dead peer shows up as a late exit. Returns, per rank,
    (exit status, seconds from start to exit, stderr).
    """
    import time

    port = free_port()
    procs, start = [], time.time()
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.update(extra_env or {})
        procs.append(subprocess.Popen([sys.executable, "-m", module, *module_args], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    ended: dict[int, float] = {}
    while len(ended) < world and time.time() - start < timeout:
        for rank, p in enumerate(procs):
            if rank not in ended and p.poll() is not None:
                ended[rank] = time.time() - start
        time.sleep(0.02)
    for p in procs:  # only the processes started here
        if p.poll() is None:
            p.kill()
    out = []
    for rank, p in enumerate(procs):
        err = p.communicate()[1]
        out.append((p.returncode, ended.get(rank, float("inf")), err))
    return out


def tiny_job_inputs(base) -> dict:
    """Digit shards (300 digits in shards of 20: a test split of ids 0..59 in 3 shards) and a
    tiny model, under the folder ``base``: the inputs of the small Γ-job tests."""
    folder = str(base / "shards")
    data = make_digit_shards(folder, limit=300, shard_size=20)
    model = str(base / "tiny.safetensors")
    save_tiny_model(model)
    return {"base": base, "folder": folder, "data": data, "model": model}


def tiny_model_data_gamma(base) -> dict:
    """A tiny model, 100 digits in shards of 20 and a constant-ish Γ file for the model, under
    ``base``: the inputs of the command-line tests (flags, errors)."""
    from adpm_dist.gamma import GammaFile, write_gamma
    from adpm_dist.models.loading import load_checkpoint

    model = str(base / "tiny.safetensors")
    save_tiny_model(model)
    data = make_digit_shards(str(base / "shards"), limit=100, shard_size=20)
    loaded = load_checkpoint(model)
    gf = GammaFile.empty(loaded.schedule, loaded.describe())
    n = loaded.schedule.num_timesteps
    gf.add(list(range(1, n + 1)) * 2, [0.5] * n + [0.6] * n)
    gf.contributions.append({"run_id": "t", "rank": 0, "world_size": 1, "samples": [0, 2]})
    gamma = str(base / "g.json")
    write_gamma(gf, gamma)
    return {"base": base, "model": model, "data": data, "gamma": gamma}
