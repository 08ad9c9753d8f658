"""Checkpoints of a training run: save (DeepSpeed state, EMA, metrics, then latest.json
last), prune old ones, and resume from what latest.json names."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from adpm_dist.io import collective, storage
from adpm_dist.io.collective import together
from adpm_dist.train.config import ConfigError
from adpm_dist.train.run_dir import EMA_FILE, LATEST, RunDir, checkpoint_tag, read_latest

# The functions take the loop's Trainer (run, engine, ema, state, metrics, cfg, info);
# typed loosely so this module does not import the loop that imports it.
Trainer = Any


def ema_bytes(t: Trainer) -> bytes:
    from adpm_dist.models.io import model_to_bytes

    meta = {"schedule": t.schedule_info, "step": t.state.step, "run_dir": t.run.url}
    return model_to_bytes(t.ema.model, metadata=meta)


def save(t: Trainer) -> None:
    """Collective: DeepSpeed state → stage, upload, then ema, metrics, latest.json (last).

    The local writes run as phases of the failure protocol (:func:`collective.together`,
    whose all-reduce is also the barrier between them): a write failing on any rank ends
    every rank, and latest.json is only written once every rank's part is safe. A failure
    inside DeepSpeed's own save ends the run through the protocol's store report.
    """
    with collective.slow():
        _save(t)


def _save(t: Trainer) -> None:
    step = t.state.step
    tag = checkpoint_tag(step)
    client = {
        "adpm_step": step,
        "adpm_bad_in_row": t.state.bad_in_row,
        "adpm_skipped_total": t.state.skipped_total,
        "adpm_ema_updates": t.ema.num_updates,
    }
    t.engine.save_checkpoint(
        t.run.stage_ckpt(), tag=tag, client_state=client, save_latest=False
    )
    t.ema.sync(list(t.engine.module.buffers()))  # collective under ZeRO-3 (sharded EMA)
    weights = ema_bytes(t) if t.info.is_main else b""

    def stage() -> None:
        collective.injected_fault(t.info.rank, "ckpt")
        if t.info.is_main:
            storage.write_bytes(os.path.join(t.run.stage_ckpt(), tag, EMA_FILE), weights)

    together(stage)

    def upload() -> None:
        if t.run.remote and t.info.local_rank == 0:
            # Each node uploads what its ranks wrote (ZeRO shards are per rank).
            storage.upload_dir(os.path.join(t.run.stage_ckpt(), tag), t.run.join("ckpt", tag))

    together(upload)

    def publish() -> None:
        storage.write_bytes(t.run.join(EMA_FILE), weights)
        t.metrics.flush(step)
        latest = {
            "step": step,
            "ema": EMA_FILE,
            "deepspeed": f"ckpt/{tag}",
            "schedule": t.schedule_info,
            "model": t.model_config,
        }
        storage.write_text(t.run.join(LATEST), json.dumps(latest, indent=2) + "\n")
        prune_run(t.run, tag, keep_last=t.cfg.train.keep_ckpts)

    together(publish, rank0_only=True)
    if t.run.remote and t.info.local_rank == 0:
        prune_stage(t.run, keep=tag)
    t.state.last_saved = step


def prune_run(run: RunDir, current: str, keep_last: int) -> None:
    """Keep ``current`` and the ``keep_last - 1`` checkpoints before it (0 keeps all).

    Runs after latest.json names ``current``. Folders newer than ``current`` (left by
    a run that crashed before its latest.json) are not counted and not touched.
    """
    if keep_last <= 0:
        return
    root = run.join("ckpt")
    tags = sorted(storage.basename(u.rstrip("/")) for u in storage.listdir(root))
    older = [t for t in tags if t.startswith("step_") and t < current]
    for tag in older[: max(0, len(older) - (keep_last - 1))]:
        storage.remove(storage.join(root, tag), recursive=True)


def prune_stage(run: RunDir, keep: str) -> None:
    """Staged copies of older checkpoints are already uploaded: free the local disk."""
    root = run.stage_ckpt()
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name != keep and name.startswith("step_"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def resume(t: Trainer) -> bool:
    """Load latest.json's checkpoint if there is one; True when resumed.

    Reading and checking latest.json, the download and the EMA load are phases of the
    failure protocol; DeepSpeed's load between them ends the run through its store report.
    """
    with collective.slow():
        latest = together(lambda: _checked_latest(t))
        if latest is None:
            return False
        tag = os.path.basename(latest["deepspeed"].rstrip("/"))
        local = os.path.join(t.run.stage_ckpt(), tag)

        def download() -> None:
            if t.run.remote and t.info.local_rank == 0:
                shutil.rmtree(local, ignore_errors=True)
                storage.download_dir(t.run.join(latest["deepspeed"]), local)

        together(download)
        path, client = t.engine.load_checkpoint(
            t.run.stage_ckpt(), tag=tag, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        together(lambda: _load_rest(t, latest, path, client, local))
    return True


def _checked_latest(t: Trainer) -> dict | None:
    """latest.json, checked against this run's schedule and model (ConfigError), or None."""
    latest = read_latest(t.run)
    if latest is None:
        return None
    where = t.run.join(LATEST)
    if latest["schedule"] != t.schedule_info:
        raise ConfigError(
            f"{where}: run was trained with schedule {latest['schedule']}, config asks for "
            f"{t.schedule_info} (config keys 'diffusion.*'); use a new train.run_dir"
        )
    if latest["model"] != t.model_config:
        from adpm_dist.models.registry import config_differences, model_name

        raise ConfigError(
            f"{where}: run was trained with model {model_name(latest['model'])!r}, config "
            f"builds {model_name(t.model_config)!r} ({config_differences(latest['model'], t.model_config)};"
            " config keys 'model.*'); use a new train.run_dir"
        )
    return latest


def _load_rest(t: Trainer, latest: dict, path, client, local: str) -> None:
    """After DeepSpeed's load: the EMA and the loop counters."""
    if path is None:
        raise RuntimeError(f"{t.run.join(latest['deepspeed'])}: DeepSpeed could not load it")
    from adpm_dist.models.io import model_from_bytes

    with open(os.path.join(local, EMA_FILE), "rb") as fh:
        ema_model, _ = model_from_bytes(fh.read(), source=os.path.join(local, EMA_FILE))
    t.ema.load_tensors(ema_model.state_dict(), client["adpm_ema_updates"])
    t.state.step = int(client["adpm_step"])
    t.state.bad_in_row = int(client["adpm_bad_in_row"])
    t.state.skipped_total = int(client["adpm_skipped_total"])
    t.state.last_saved = t.state.step
    if t.state.step != int(latest["step"]):
        raise RuntimeError(f"{t.run.join(LATEST)}: step {latest['step']} but checkpoint has {t.state.step}")
