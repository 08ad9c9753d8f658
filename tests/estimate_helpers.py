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
