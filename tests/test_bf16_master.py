"""bf16 training keeps fp32 master weights, the EMA averages them, gradients reduce in fp32
(issue 22, item 2), DeepSpeed on CPU (bf16 runs there).

After N bf16 steps the trainer's EMA (``bind_ema``: full, fragment-sharded under ZeRO-1/2 or
partition-sharded under ZeRO-3) equals a plain fp32 EMA updated at every step from the
master weights that DeepSpeed's public ``safe_get_full_fp32_param`` assembles, and it
differs from the EMA of the bf16-rounded module weights (what the trainer averaged before),
so the test catches the old behaviour. The masters are checked to be the weights: the
module's bf16 weights are exactly their rounding. Every gradient collective is spied on:
all carry fp32 (without ``communication_data_type`` they carry bf16).

One rank in process (ZeRO-0/1/3), two ranks under torchrun (ZeRO-1 and 3, where each rank
owns only a piece of the masters). This file is also that worker
(``python tests/test_bf16_master.py --worker OUT``).
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

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
SEEN: list = []  # (collective, dtype) since the spy was installed


def _spy_collectives() -> None:
    """Record (name, dtype) of every tensor collective DeepSpeed issues through torch.distributed
    (installed before DeepSpeed's comm backend binds them)."""
    import torch.distributed as td

    for name in ("all_reduce", "reduce_scatter_tensor", "reduce_scatter"):
        orig = getattr(td, name)
        if getattr(orig, "_spy", False):
            continue

        def spy(*a, _o=orig, _n=name, **k):
            t = a[0] if a else next(iter(k.values()))
            SEEN.append((_n, getattr(t, "dtype", None)))
            return _o(*a, **k)

        spy._spy = True
        setattr(td, name, spy)


def _full_masters(engine) -> list[torch.Tensor]:
    """The fp32 masters by DeepSpeed's public API (ZeRO-0 has none: its optimizer's fp32 groups)."""
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 0:
        opt = engine.optimizer
        by_id = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
        return [by_id[id(p)].detach().clone() for p in params]
    return [deepspeed.utils.safe_get_full_fp32_param(p).detach().clone() for p in params]


def _bf16_run(stage: int, world_size: int, rank: int, comm_fp32: bool = True) -> dict:
    """N bf16 steps; the bound EMA, the fp32 reference and the bf16-weights EMA, and the dtypes
    of the gradient collectives of the last step."""
    from adpm_dist.diffusion.schedule import make_schedule
    from adpm_dist.models.registry import build_model
    from adpm_dist.train import engine as eng
    from adpm_dist.train.config import build_config
    from adpm_dist.train.ema import EMA
    from adpm_dist.train.ema_sharded import bind_ema
    from adpm_dist.train.objective import training_loss

    cfg = build_config(preset="tiny", overrides=[
        f"train.zero_stage={stage}", "train.precision=bf16", "data.batch_size=8",
        "optim.warmup_steps=0", "optim.lr=1e-2"])
    torch.manual_seed(0)
    model = build_model("tiny")
    ema = EMA(model, 0.9, warmup=True)
    reference, old = copy.deepcopy(ema), copy.deepcopy(ema)
    ds_config = eng.deepspeed_config(cfg, world_size)
    if not comm_fp32:
        ds_config.pop("communication_data_type")
    orig, eng.deepspeed_config = eng.deepspeed_config, lambda *_: ds_config
    try:
        engine = eng.build_engine(cfg, model, world_size)
    finally:
        eng.deepspeed_config = orig
    bound = bind_ema(ema, engine)
    params = list(engine.module.parameters())
    schedule, seen = make_schedule("linear", 1000), SEEN
    gen = torch.Generator().manual_seed(100 + rank)
    for step in range(STEPS):
        x0 = torch.rand(8 // world_size, 1, 8, 8, generator=gen) * 2 - 1
        seen.clear()
        engine.backward(training_loss(engine, x0, schedule, seed=0, step=step, rank=rank))
        engine.step()
        grads_seen = [d for n, d in seen if d not in (torch.uint8, torch.float64)]  # flags, norms
        bound.update()
        masters = _full_masters(engine)
        with eng.full_parameters(engine):
            weights = [p.detach().clone() for p in params]
        for m, w in zip(masters, weights):
            assert m.dtype == torch.float32 and w.dtype == torch.bfloat16
            assert torch.equal(m.to(torch.bfloat16), w)  # the module holds the masters, rounded
        reference.update(masters)
        old.update(weights)
    bound.sync(list(engine.module.buffers()))
    return {"ema": bound.state_tensors(), "reference": reference.state_tensors(),
            "old": old.state_tensors(), "masters": masters, "grads_seen": grads_seen,
            "comm": (engine.communication_data_type,
                     getattr(engine.optimizer, "communication_data_type", None)),
            "layout": eng.master_layout(engine),
            "own": sum(t.numel() for t in getattr(bound, "shards", [])),
            "total": sum(t.numel() for t in masters)}


def _check(run: dict) -> None:
    want, got, old = run["reference"], run["ema"], run["old"]
    assert sorted(got) == sorted(want)
    diff = {k: float((got[k] - want[k]).abs().max()) for k in want}
    assert max(diff.values()) == 0.0, diff  # the same fp32 lerps on the same fp32 masters
    stale = max(float((old[k] - want[k]).abs().max()) for k in want)
    assert stale > 1e-4, stale  # the EMA of the bf16 weights is measurably another thing
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in run["masters"])
    assert run["grads_seen"] and set(run["grads_seen"]) == {torch.float32}, run["grads_seen"]
    assert torch.bfloat16 not in run["comm"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bf16_ema_follows_the_fp32_masters_and_grads_reduce_in_fp32_one_rank():
    """ZeRO-0/1/3 on one rank (ZeRO-2 masters are laid out as ZeRO-1's); and without the config
    key the gradients travel in bf16."""
    from adpm_dist.io import dist
    from adpm_dist.train.engine import forget_deepspeed_groups, prepare_deepspeed

    prepare_deepspeed()
    _spy_collectives()
    dist.init_group()
    try:
        layouts = {}
        for stage in (0, 1, 3):
            run = _bf16_run(stage, 1, 0)
            _check(run)
            layouts[stage] = run["layout"]
        assert layouts == {0: "full", 1: "fragment", 3: "partition"}
        before = _bf16_run(0, 1, 0, comm_fp32=False)  # what DeepSpeed does by default
        assert set(before["grads_seen"]) == {torch.bfloat16}
    finally:
        dist.shutdown()
        forget_deepspeed_groups()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(out: str) -> int:
    from adpm_dist.io import dist
    from adpm_dist.train.engine import prepare_deepspeed

    prepare_deepspeed()
    _spy_collectives()
    info = dist.init_group()
    for stage in (1, 3):
        run = _bf16_run(stage, info.world_size, info.rank)
        _check(run)
        assert 0 < run["own"] < run["total"], (run["own"], run["total"])  # a piece, not all
        Path(out, f"ok{stage}_{info.rank}").write_text(str(run["own"]))
    dist.shutdown()
    return 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bf16_ema_follows_the_fp32_masters_on_two_ranks(tmp_path):
    """ZeRO-1 (each rank owns a fragment of the masters) and ZeRO-3 (a partition), 2 ranks."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         str(Path(__file__).resolve()), "--worker", str(tmp_path)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=200,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok1_0", "ok1_1", "ok3_0", "ok3_1"]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.exit(_worker(sys.argv[2]))
