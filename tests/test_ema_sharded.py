"""The ZeRO-3 EMA (issue 16, item 1) under real torchrun, 2 ranks, gloo, DeepSpeed on CPU.

Each rank averages only its own ZeRO-3 partition; after three training steps the assembled
weights equal, bit for bit, the unsharded EMA updated from the gathered full weights at every
step (what the trainer did before); re-partitioning a checkpoint's full EMA gives them back.
The trainer's own ZeRO-3 path (checkpoint, resume, sample grid) is exercised by
tests/test_train.py and tests/test_device.py with ``train.zero_stage=3``.

This file is also the torchrun worker (``python tests/test_ema_sharded.py --worker OUT``).
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(out: str) -> int:
    import deepspeed

    from adpm_dist.diffusion.schedule import make_schedule
    from adpm_dist.io import dist
    from adpm_dist.models.registry import build_model
    from adpm_dist.train.config import build_config
    from adpm_dist.train.ema import EMA
    from adpm_dist.train.ema_sharded import ShardedEMA
    from adpm_dist.train.engine import build_engine, prepare_deepspeed
    from adpm_dist.train.objective import training_loss

    prepare_deepspeed()
    info = dist.init_group()
    cfg = build_config(preset="tiny", overrides=[
        "train.zero_stage=3", "data.batch_size=8", "optim.warmup_steps=0", "optim.lr=1e-2"])
    torch.manual_seed(0)
    model = build_model("tiny")
    full = EMA(model, 0.9, warmup=True)
    reference = copy.deepcopy(full)
    engine = build_engine(cfg, model, info.world_size)
    params = list(engine.module.parameters())
    sharded = ShardedEMA(full, params)
    own = sum(s.numel() for s in sharded.shards)
    total = sum(p.numel() for p in reference.model.parameters())
    assert own < total, (own, total)  # each rank holds about half of the EMA
    initial = {k: v.clone() for k, v in reference.state_tensors().items()}
    schedule = make_schedule("linear", 1000)
    gen = torch.Generator().manual_seed(100 + info.rank)
    for step in range(3):
        x0 = torch.rand(4, 1, 8, 8, generator=gen) * 2 - 1
        loss = training_loss(engine, x0, schedule, seed=0, step=step, rank=info.rank)
        engine.backward(loss)
        engine.step()
        sharded.update()
        with deepspeed.zero.GatheredParameters(params):
            reference.update([p.detach().clone() for p in params], list(engine.module.buffers()))
    sharded.sync(list(engine.module.buffers()))
    got, want = sharded.state_tensors(), reference.state_tensors()
    assert sorted(got) == sorted(want)
    diffs = {k: float((got[k] - want[k]).abs().max()) for k in want if not torch.equal(got[k], want[k])}
    assert not diffs, diffs
    assert any(not torch.equal(want[k], initial[k]) for k in want)  # the steps moved the EMA
    # Resume: the full tensors of a checkpoint, re-partitioned, assemble to the same weights.
    again = ShardedEMA(EMA(build_model("tiny"), 0.9), params)
    again.load_tensors(want, reference.num_updates)
    again.sync()
    assert all(torch.equal(again.state_tensors()[k], want[k]) for k in want)
    assert again.num_updates == 3
    Path(out, f"ok{info.rank}").write_text(str(own))
    dist.shutdown()
    return 0


def test_sharded_ema_equals_the_gathered_ema_on_two_ranks(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         str(Path(__file__).resolve()), "--worker", str(tmp_path)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=240,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
             "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    from adpm_dist.models.registry import build_model

    sizes = [int((tmp_path / f"ok{r}").read_text()) for r in (0, 1)]
    # ZeRO-3 pads each parameter to a multiple of the world size, then splits it in two.
    padded = sum(-(-p.numel() // 2) for p in build_model("tiny").parameters())
    assert sizes == [padded, padded]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.exit(_worker(sys.argv[2]))
