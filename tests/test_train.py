"""Single-process training with the real DeepSpeed engine on 8×8 digits shards.

Exact resume (local and s3:// on the rclone S3 server), preemption by a real
signal, non-finite losses, idempotent reruns. Weights are compared with the
uninterrupted run of the same config, read back from what each run wrote.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adpm_dist.io import preempt, storage
from adpm_dist.models.io import model_from_bytes
from adpm_dist.train import loop as train
from adpm_dist.train.config import preset_path
from adpm_dist.train.run_dir import read_metrics

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it

ROOT = Path(__file__).resolve().parent.parent
TOTAL = 12


def tiny_args(digits: str, run_dir: str, *extra: str) -> list[str]:
    return [
        "--config", str(preset_path("tiny")),
        f"data.urls=[{digits}]", f"train.run_dir={run_dir}",
        f"train.total_steps={TOTAL}", "train.ckpt_every=100", "train.log_every=1",
        "data.batch_size=8", *extra,
    ]


def final_state(run_dir: str) -> tuple[int, dict, dict, list[dict]]:
    """(step, DeepSpeed module weights, EMA weights, metrics) as the run left them."""
    latest = json.loads(storage.read_text(storage.join(run_dir, "latest.json")))
    blob = storage.read_bytes(
        storage.join(run_dir, latest["deepspeed"], "mp_rank_00_model_states.pt")
    )
    module = torch.load(io.BytesIO(blob), weights_only=True)["module"]
    ema_model, meta = model_from_bytes(storage.read_bytes(storage.join(run_dir, latest["ema"])))
    assert meta["step"] == latest["step"]
    assert meta["schedule"] == latest["schedule"] == {"name": "linear", "num_timesteps": 1000}
    assert ema_model.config == latest["model"]
    metrics = read_metrics(run_dir)
    return latest["step"], module, ema_model.state_dict(), metrics


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """TOTAL steps without interruption."""
    run = str(tmp_path_factory.mktemp("ref") / "run")
    assert train.main(tiny_args(digits, run)) == 0
    return final_state(run)


@pytest.mark.timeout(180)
def test_uninterrupted_run_learns_and_writes_the_contract(reference):
    step, module, ema, metrics = reference
    assert step == TOTAL
    assert [m["step"] for m in metrics] == list(range(1, TOTAL + 1))
    losses = [m["loss"] for m in metrics]
    assert all(0 < x < 5 for x in losses)
    assert sum(losses[-4:]) < sum(losses[:4])  # the loss falls
    assert all(m["lr"] > 0 and m["grad_norm"] > 0 and m["images_per_s"] > 0 for m in metrics)
    # warm-up: lr rises linearly over the first optim.warmup_steps (5 in tiny) updates
    assert metrics[0]["lr"] == pytest.approx(1e-3 / 5) and metrics[5]["lr"] == pytest.approx(1e-3)
    # EMA differs from the raw weights but has moved away from the initial weights
    assert any(not torch.equal(ema[k], module[k]) for k in module)


@pytest.mark.timeout(240)
def test_exact_resume_from_s3_matches_uninterrupted(digits, reference, s3_bucket, tmp_path):
    run = f"{s3_bucket}/runs/tiny"
    first = tiny_args(digits, run, f"train.stage_dir={tmp_path / 'stage_a'}", "train.total_steps=5")
    assert train.main(first) == 0
    assert storage.exists(f"{run}/ckpt/step_00000005/mp_rank_00_model_states.pt")
    assert json.loads(storage.read_text(f"{run}/latest.json"))["step"] == 5
    # A different staging folder: the state must really come back from S3.
    second = tiny_args(digits, run, f"train.stage_dir={tmp_path / 'stage_b'}",
                       "train.keep_ckpts=1")
    assert train.main(second) == 0
    step, module, ema, metrics = final_state(run)
    ref_step, ref_module, ref_ema, ref_metrics = reference
    assert step == ref_step == TOTAL
    assert_same(module, ref_module)
    assert_same(ema, ref_ema)
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in ref_metrics])
    assert storage.exists(f"{run}/config.yaml") and storage.exists(f"{run}/ema.safetensors")
    # keep_ckpts=1: the step-5 checkpoint was pruned once step 12 was safely written
    assert [storage.basename(u.rstrip("/")) for u in storage.listdir(f"{run}/ckpt")] == [
        f"step_{TOTAL:08d}"]
    # Rerunning a finished run is a no-op.
    before = storage.read_text(f"{run}/latest.json")
    assert train.main(second) == 0
    assert storage.read_text(f"{run}/latest.json") == before


def _lines_logged(run: Path) -> list[str]:
    """Complete lines in a live run's metrics parts (a part may be mid-append)."""
    lines = []
    for part in sorted((run / "metrics").glob("*.jsonl")):
        lines += part.read_text().splitlines()
    return lines


@pytest.mark.timeout(240)
def test_sigusr1_checkpoints_exits_for_requeue_and_resumes_exactly(digits, reference, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "adpm_dist.train", *tiny_args(digits, str(run)),
         "train.progress=false"],
        cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics").exists() and len(_lines_logged(run)) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == preempt.REQUEUE_EXIT_CODE, out
    assert "preempted (SIGUSR1)" in out
    latest = json.loads((run / "latest.json").read_text())
    stopped = latest["step"]
    assert 2 <= stopped < TOTAL  # it finished the step in flight, then stopped
    assert (run / "ckpt" / f"step_{stopped:08d}" / "mp_rank_00_model_states.pt").exists()
    assert read_metrics(str(run))[-1]["step"] == stopped
    # The requeued job (same command) resumes and ends where the uninterrupted run did.
    assert train.main(tiny_args(digits, str(run))) == 0
    step, module, ema, got = final_state(str(run))
    assert step == TOTAL
    assert_same(module, reference[1])
    assert_same(ema, reference[2])
    assert [m["step"] for m in got] == list(range(1, TOTAL + 1))


@pytest.mark.timeout(180)
def test_nonfinite_losses_are_skipped_then_the_run_stops(digits, tmp_path):
    # lr = 1e30: the first update blows the weights up, every later loss is inf/NaN.
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        rc = train.main(tiny_args(digits, str(run), "optim.lr=1e30", "optim.warmup_steps=0"))
    assert rc == train.DIVERGED_EXIT_CODE
    metrics = read_metrics(str(run))
    assert [m["skipped"] for m in metrics] == [False, True, True, True]
    assert metrics[0]["loss"] is not None
    assert all(m["loss"] is None and m["nonfinite_loss"] in ("nan", "inf") for m in metrics[1:])
    latest = json.loads((run / "latest.json").read_text())
    assert latest["step"] == 4  # saved before stopping
    # The saved state is the one after the last good update: skipped steps changed nothing.
    blob = (run / latest["deepspeed"] / "mp_rank_00_model_states.pt").read_bytes()
    state = torch.load(io.BytesIO(blob), weights_only=True)
    assert state["global_steps"] == 1 and state["adpm_bad_in_row"] == 3


@pytest.mark.timeout(120)
def test_resume_refuses_a_different_model(digits, reference, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(tiny_args(digits, str(run), "train.total_steps=1")) == 0
    capsys.readouterr()
    rc = train.main(tiny_args(digits, str(run), "model.options.ch=8"))
    assert rc == train.CONFIG_ERROR_EXIT_CODE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    # Both models by name, and the one key that differs, not two copies of the whole config.
    assert "'tiny:unet-ch16-res8-c1'" in err and "'tiny+ch=8:unet-ch8-res8-c1'" in err
    assert "ch 16 → 8" in err and "num_res_blocks" not in err and "use a new train.run_dir" in err


@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine_opts", [["train.zero_stage=2"], ["train.zero_stage=3"],
                                         ["train.precision=bf16", "train.zero_stage=1"]])
def test_exact_resume_with_other_zero_stages_and_bf16(digits, tmp_path, engine_opts):
    def ema_of(run: Path) -> dict:
        model, _ = model_from_bytes((run / "ema.safetensors").read_bytes())
        return model.state_dict()

    grids = engine_opts == ["train.zero_stage=2"]  # sample grids once: they cost CPU time
    opts = [*engine_opts] + (["train.sample_every=4", "train.sample_steps=5",
                              "train.sample_count=4"] if grids else [])
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert train.main(tiny_args(digits, str(straight), *opts, "train.total_steps=4")) == 0
    assert train.main(tiny_args(digits, str(broken), *opts, "train.total_steps=2")) == 0
    assert train.main(tiny_args(digits, str(broken), *opts, "train.total_steps=4")) == 0
    assert_same(ema_of(broken), ema_of(straight))
    if grids:
        from PIL import Image

        grid = Image.open(straight / "samples" / "step_00000004.png")
        # 4 EMA samples of 8×8, 2×2, each shown at 64×64 (nearest-neighbour ×8)
        assert grid.size == (128, 128) and grid.mode == "L"
        blocks = torch.from_numpy(np.asarray(grid)).unfold(0, 8, 8).unfold(1, 8, 8)
        assert (blocks == blocks[..., :1, :1]).all()  # every 8×8 block is one sample pixel


@pytest.mark.parametrize("size, factor", [(8, 8), (28, 3), (32, 2), (64, 1), (100, 1)])
def test_sample_grid_is_upscaled_nearest_neighbour(size, factor):
    from adpm_dist.train.grid import MIN_IMAGE_PX, tile, upscale

    imgs = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    grid = upscale(tile(imgs), size)
    assert grid.shape == (3, 2 * size * factor, 2 * size * factor)
    assert MIN_IMAGE_PX == 64  # docs/train.md states it
    torch.testing.assert_close(grid[:, ::factor, ::factor], tile(imgs), rtol=0, atol=0)
    assert torch.equal(grid[:, factor - 1::factor, factor - 1::factor], tile(imgs))


def test_ema_follows_its_formula_in_fp32():
    from adpm_dist.train.ema import EMA

    net = torch.nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(net, decay=0.9, warmup=True)
    assert all(p.dtype == torch.float32 for p in ema.model.parameters())
    start = [p.detach().float().clone() for p in ema.model.parameters()]
    target = [torch.full_like(p, 2.0) for p in start]
    ema.update(target)  # update 0: d = min(0.9, 1/10) = 0.1
    ema.update(target)  # update 1: d = min(0.9, 2/11)
    d0, d1 = 0.1, 2 / 11
    for p, s in zip(ema.model.parameters(), start):
        after0 = d0 * s + (1 - d0) * 2.0
        torch.testing.assert_close(p, d1 * after0 + (1 - d1) * 2.0)
    with pytest.raises(ValueError):
        EMA(net, decay=1.0)


# ---------------------------------------------------------------- metrics parts


def _record(step: int) -> dict:
    # Padded so every line has the same length, whatever the step's digits.
    return {"step": step, "pad": "x" * (6 - len(str(step))), "loss": 0.5, "skipped": False}


def _metrics_run(where: str, request) -> str:
    return (f"{request.getfixturevalue('s3_bucket')}/runs/metrics" if where == "s3"
            else str(request.getfixturevalue("tmp_path") / "run"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_metrics_bytes_per_checkpoint_do_not_grow_with_the_run(where, request, monkeypatch):
    from adpm_dist.train import run_dir as rd

    run = rd.RunDir.create(_metrics_run(where, request), str(request.getfixturevalue("tmp_path")))
    writes: list[int] = []  # bytes of every whole-object write the metrics make
    real = rd.storage.write_text

    def counting(url: str, text: str, **kw):
        writes.append(len(text.encode()))
        return real(url, text, **kw)

    monkeypatch.setattr(rd.storage, "write_text", counting)
    metrics = rd.Metrics(run, 0, enabled=True)
    every, segments = 5, 30
    line = len(json.dumps(_record(10)).encode()) + 1  # every record has the same size
    per_ckpt = []
    for step in range(1, every * segments + 1):
        metrics.append(_record(step))
        if step % every == 0:
            before = sum(writes)
            metrics.flush(step)
            per_ckpt.append(sum(writes) - before)
    if run.remote:  # checkpoint 30 uploads exactly what checkpoint 1 did: its 5 lines
        assert per_ckpt == [every * line] * segments
    else:  # local: records are appended, nothing is ever rewritten
        assert writes == [] and per_ckpt == [0] * segments
        size = sum(p.stat().st_size for p in Path(run.url, "metrics").glob("*.jsonl"))
        assert size == every * segments * line
    assert [m["step"] for m in rd.read_metrics(run.url)] == list(range(1, every * segments + 1))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_metrics_resume_after_a_crash_keeps_each_step_once(where, request):
    from adpm_dist.train import run_dir as rd

    run = rd.RunDir.create(_metrics_run(where, request), str(request.getfixturevalue("tmp_path")))
    first = rd.Metrics(run, 0, enabled=True)
    for step in range(1, 6):
        first.append(_record(step))
    first.flush(5)  # checkpoint 5 made it (latest.json = 5)
    for step in range(6, 9):
        first.append(_record(step))
    first.flush(8)  # metrics of checkpoint 8 written, then a crash before its latest.json
    first.append(_record(9))  # and a record of the segment after it (local: on disk)
    if not run.remote:
        with open(Path(run.url, "metrics", "00000008.jsonl"), "a") as fh:
            fh.write('{"step": 10, "lo')  # torn by the crash
    again = rd.Metrics(run, 5, enabled=True)  # the rerun resumes from latest.json: step 5
    for step in range(6, 12):
        again.append(_record(step))
    again.flush(11)
    assert [m["step"] for m in rd.read_metrics(run.url)] == list(range(1, 12))
    assert [storage.basename(u) for u in rd.metrics_parts(run.url)] == [
        "00000000.jsonl", "00000005.jsonl"]


# ---------------------------------------------------------------- error policy


def test_bad_flag_is_one_error_line_and_exit_2():
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "adpm_dist.train", "--no-such-flag"],
                         cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--no-such-flag" in lines[0]
    assert "Traceback" not in res.stderr


def test_an_internal_valueerror_is_not_reported_as_bad_input(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("internal bug, not the user's input")

    monkeypatch.setattr(train, "build_config", broken)
    with pytest.raises(ValueError, match="internal bug"):
        train.main(["--config", str(preset_path("tiny"))])
    assert "error:" not in capsys.readouterr().err
