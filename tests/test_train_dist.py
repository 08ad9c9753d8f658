"""Multi-process DeepSpeed training on CPU (gloo) under real torchrun.

* 2 processes on one "node": gradients after ``engine.backward`` equal a
  single-process full-batch reference (ZeRO-0 and ZeRO-2); after real training
  (ZeRO-1) every rank holds identical parameters; SIGTERM to ONE rank stops
  both after the same step with the requeue status.
* 2 "nodes" on one host (two ``torchrun --nnodes 2`` processes, separate staging
  folders as on separate machines) stream shards from and checkpoint to the
  rclone S3 server, then resume from it; the result equals the uninterrupted
  2-rank run exactly.

This file is also the torchrun worker (``python tests/test_train_dist.py --worker``).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it

ROOT = Path(__file__).resolve().parent.parent
STAGES = (0, 2)  # ZeRO stages of the gradient check
FIT_STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _fit_args(urls: str, run_dir: str, *extra: str) -> list[str]:
    from adpm_dist.train.config import preset_path

    return [
        "--config", str(preset_path("tiny")), f"data.urls=[{urls}]",
        f"train.run_dir={run_dir}", f"train.total_steps={FIT_STEPS}", "train.ckpt_every=100",
        "train.log_every=1", "train.zero_stage=1", "data.batch_size=8", "train.progress=false",
        *extra,
    ]


# ---------------------------------------------------------------- the torchrun worker


def _worker(out: str, digits: str) -> int:
    import copy

    import numpy as np
    from deepspeed.utils import safe_get_full_grad

    from adpm_dist.io import dist, preempt
    from adpm_dist.models.registry import build_model
    from adpm_dist.train import loop as train
    from adpm_dist.train import objective
    from adpm_dist.train.config import build_config
    from adpm_dist.train.engine import build_engine, prepare_deepspeed

    prepare_deepspeed()
    info = dist.init_group()
    rank, world = info.rank, info.world_size
    outp = Path(out)

    # 1. Gradients of one step vs a single-process full-batch reference.
    full = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(123)) * 2 - 1
    per = full.shape[0] // world
    for stage in STAGES:
        cfg = build_config(preset="tiny", overrides=[
            f"train.zero_stage={stage}", "data.batch_size=8", "optim.grad_clip=0"])
        torch.manual_seed(0)
        model = build_model("tiny")
        reference = copy.deepcopy(model)
        engine = build_engine(cfg, model, world)
        schedule = train.make_schedule("linear", 1000)
        loss = objective.training_loss(engine, full[rank * per:(rank + 1) * per], schedule,
                                       seed=0, step=3, rank=rank)
        engine.backward(loss)
        grads = {k: safe_get_full_grad(p).detach().clone() for k, p in
                 engine.module.named_parameters()}
        torch.save(grads, outp / f"grads_z{stage}_r{rank}.pt")
        if rank == 0:
            # Reference: the whole batch in one process, noise as each rank drew it,
            # x_n built here from the float64 schedule (not with objective.diffuse).
            draws = [objective.draw_noise((per, 1, 8, 8), 1000, 0, 3, r) for r in range(world)]
            n = torch.cat([d[0] for d in draws])
            eps = torch.cat([d[1] for d in draws])
            abar = np.asarray(schedule.alphas_cumprod)[n.numpy()]
            a = torch.tensor(np.sqrt(abar), dtype=torch.float32).view(-1, 1, 1, 1)
            b = torch.tensor(np.sqrt(1 - abar), dtype=torch.float32).view(-1, 1, 1, 1)
            pred = reference(a * full + b * eps, n)
            ((pred - eps) ** 2).mean().backward()
            torch.save({k: p.grad for k, p in reference.named_parameters()}, outp / f"ref_z{stage}.pt")
        dist.barrier()
        del engine

    # 2. Real training, ZeRO-1, ranks see different data: parameters must stay identical.
    run = str(outp / "run")
    cfg = build_config(None, _fit_args(digits, run)[2:], preset="tiny")
    with preempt.PreemptionHandler():
        trainer = train.Trainer(cfg, info)
        rc = trainer.fit()
        torch.save({k: v.clone() for k, v in trainer.engine.module.state_dict().items()},
                   outp / f"fit_r{rank}.pt")
    # 3. Resume to FIT_STEPS + 2, SIGTERM to rank 1 only: both stop after one step.
    cfg.train.total_steps = FIT_STEPS + 2
    with preempt.PreemptionHandler():
        trainer = train.Trainer(cfg, info)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        rc_pre = trainer.fit()
        step = trainer.state.step
    (outp / f"rc_r{rank}.json").write_text(json.dumps({"fit": rc, "preempt": rc_pre,
                                                       "step": step}))
    dist.shutdown()
    return 0


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    import make_shards

    out = tmp_path_factory.mktemp("digits") / "shards"
    make_shards.main(["digits", str(out), "--shard-size", "400"])
    return out


@pytest.fixture(scope="module")
def two_rank_run(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         str(Path(__file__).resolve()), "--worker", str(out), str(digits / "train-*.tar")],
        cwd=str(ROOT), env=_env(), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", STAGES)
def test_gradients_equal_full_batch_reference(two_rank_run, stage):
    ref = _load(two_rank_run / f"ref_z{stage}.pt")
    for rank in (0, 1):
        got = _load(two_rank_run / f"grads_z{stage}_r{rank}.pt")
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-7, msg=k)
    # the check is not vacuous: gradients are far from zero
    assert sum(float(g.abs().sum()) for g in ref.values()) > 1.0


@pytest.mark.timeout(300)
def test_parameters_identical_across_ranks_and_sigterm_on_one_rank_stops_all(two_rank_run):
    r0, r1 = _load(two_rank_run / "fit_r0.pt"), _load(two_rank_run / "fit_r1.pt")
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    status = [json.loads((two_rank_run / f"rc_r{r}.json").read_text()) for r in (0, 1)]
    assert all(s["fit"] == 0 for s in status)
    from adpm_dist.io.preempt import REQUEUE_EXIT_CODE

    assert [s["preempt"] for s in status] == [REQUEUE_EXIT_CODE] * 2
    assert [s["step"] for s in status] == [FIT_STEPS + 1] * 2  # the step in flight, then stop
    latest = json.loads((two_rank_run / "run" / "latest.json").read_text())
    assert latest["step"] == FIT_STEPS + 1
    ckpt = two_rank_run / "run" / latest["deepspeed"]
    assert {p.name for p in ckpt.iterdir()} >= {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt", "ema.safetensors"}


def _two_nodes(urls: str, run: str, stage_root: Path, server, *extra: str) -> list[str]:
    from tests.s3_server import subprocess_env

    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--node_rank", str(node), "--nproc_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "adpm_dist.train",
               *_fit_args(urls, run, f"train.stage_dir={stage_root / f'node{node}'}", *extra)]
        env = subprocess_env(server, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                             PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=200)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
    return outs


@pytest.mark.timeout(400)
def test_two_nodes_train_checkpoint_and_resume_on_s3(digits, two_rank_run, s3_server, s3_bucket,
                                                     tmp_path):
    from adpm_dist.io import storage
    from adpm_dist.models.io import model_from_bytes

    storage.upload_dir(str(digits), f"{s3_bucket}/shards/digits")
    urls = f"{s3_bucket}/shards/digits/train-*.tar"
    run = f"{s3_bucket}/runs/two-nodes"
    _two_nodes(urls, run, tmp_path, s3_server, f"train.total_steps={FIT_STEPS - 3}")
    first = f"{run}/ckpt/step_{FIT_STEPS - 3:08d}"
    # node 1's optimizer shard was written on node 1 and uploaded by node 1
    assert storage.exists(f"{first}/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert storage.exists(f"{first}/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert json.loads(storage.read_text(f"{run}/latest.json"))["step"] == FIT_STEPS - 3

    outs = _two_nodes(urls, run, tmp_path / "fresh", s3_server)  # new staging: state from S3
    assert f"resumed at step {FIT_STEPS - 3}" in outs[0]
    latest = json.loads(storage.read_text(f"{run}/latest.json"))
    assert latest["step"] == FIT_STEPS
    blob = storage.read_bytes(f"{run}/{latest['deepspeed']}/mp_rank_00_model_states.pt")
    module = torch.load(io.BytesIO(blob), weights_only=True)["module"]
    # Same seed, data, world size and stage as the uninterrupted 2-rank run: same weights.
    expected = _load(two_rank_run / "fit_r0.pt")
    for k in expected:
        torch.testing.assert_close(module[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
    ema, meta = model_from_bytes(storage.read_bytes(f"{run}/ema.safetensors"))
    assert meta["step"] == FIT_STEPS and meta["run_dir"] == run
    from adpm_dist.train.run_dir import read_metrics

    assert [m["step"] for m in read_metrics(run)] == list(range(1, FIT_STEPS + 1))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(_worker(sys.argv[2], sys.argv[3]))
