"""Training of the ε-network with DeepSpeed over torch.distributed.

    python -m adpm_dist.train --config configs/tiny.yaml train.run_dir=s3://b/run key=value ...
    torchrun --nproc_per_node 2 -m adpm_dist.train --config configs/cifar10.yaml ...

One DeepSpeed engine on every path (single process included): ZeRO stage from
the config, fp32 on CPU and bf16 on GPU, torch AdamW with explicit weight decay,
linear warm-up, gradient clipping, and an fp32 EMA of the weights.

Loss (L_simple, :mod:`adpm_dist.train.objective`): n ~ U{1..N}, ε ~ N(0, I),
x_n = √ᾱ_n x_0 + √β̄_n ε, loss = ‖ε_θ(x_n, n) − ε‖² (mean), or the L1 norm. The
timesteps, the noise and the dropout RNG of step s on rank r come from generators
seeded by (seed, s, r): nothing random depends on history, which is what makes
resume exact.

Run directory (a local path or ``s3://``; :mod:`adpm_dist.train.run_dir`)::

    config.yaml              resolved config of the latest (re)start
    ckpt/step_XXXXXXXX/      DeepSpeed state (+ ema.safetensors of that step)
    ema.safetensors          fp32 EMA weights: what estimation and sampling load
    metrics.jsonl            one JSON object per logged step
    samples/step_XXXXXXXX.png  optional sample grids
    latest.json              written LAST; rerunning resumes from it

Exit status: 0 done; ``preempt.REQUEUE_EXIT_CODE`` (75) checkpointed after
SIGUSR1/SIGTERM, requeue me; ``DIVERGED_EXIT_CODE`` (3) stopped after
``train.max_bad_steps`` non-finite losses in a row (last good state saved);
2 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.io import dist, preempt, storage
from adpm_dist.train.config import Config, ConfigError, build_config, config_to_yaml
from adpm_dist.train.ema import EMA
from adpm_dist.train.engine import (
    build_engine,
    forget_deepspeed_groups,
    full_parameters,
    grad_norm_zero0,
    per_rank_batch,
    prepare_deepspeed,
)
from adpm_dist.train.objective import training_loss
from adpm_dist.train.run_dir import EMA_FILE, LATEST, Metrics, RunDir, checkpoint_tag, read_latest

DIVERGED_EXIT_CODE = 3
CONFIG_ERROR_EXIT_CODE = 2

log = logging.getLogger("adpm_dist.train.loop")


# ---------------------------------------------------------------- data


def batches_from(stream, start_step: int, batches_per_epoch: int) -> Iterator[torch.Tensor]:
    """Batches from step ``start_step`` on: epoch s // B, skipping the s % B already used."""
    epoch, skip = divmod(start_step, batches_per_epoch)
    while True:
        count = 0
        for i, batch in enumerate(stream.epoch(epoch)):
            count += 1
            if i >= skip:
                yield batch
        if count != batches_per_epoch:
            raise RuntimeError(
                f"training stream epoch {epoch} gave {count} batches, expected {batches_per_epoch}"
            )
        epoch, skip = epoch + 1, 0


def default_batches_per_epoch(cfg: Config) -> int:
    """One pass over the data set: (samples in the manifests) // global batch (at least 1)."""
    from adpm_dist.io.shards import expand_urls, shard_table

    shards, _ = shard_table(expand_urls(list(cfg.data.urls)), require_manifest=False)
    if any(s.count is None for s in shards):
        raise ConfigError(
            "config key 'data.batches_per_epoch' is 0 but the shards have no manifest to count "
            "samples from; set it explicitly"
        )
    return max(1, sum(int(s.count) for s in shards) // cfg.data.batch_size)


def make_stream(cfg: Config, model_config: dict, info: dist.DistInfo):
    """The data layer's TrainStream for this rank (equal batch counts on every rank)."""
    from adpm_dist.io import data

    per_rank = per_rank_batch(cfg, info.world_size)
    bpe = cfg.data.batches_per_epoch
    if bpe == 0:
        bpe = default_batches_per_epoch(cfg)
    resolution = cfg.data.resolution or model_config.get("resolution")
    channels = cfg.data.channels or model_config.get("in_channels")
    stream = data.TrainStream(
        list(cfg.data.urls),
        batch_size=per_rank,
        seed=cfg.train.seed,
        rank=info.rank,
        world_size=info.world_size,
        batches_per_epoch=bpe,
        num_workers=cfg.data.num_workers,
        resolution=resolution,
        channels=channels,
        hflip=cfg.data.hflip,
        shuffle_buffer=cfg.data.shuffle_buffer,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )
    return stream, bpe




# ---------------------------------------------------------------- the trainer


@dataclass
class State:
    """Loop counters; all but last_saved travel in the checkpoint's client state."""

    step: int = 0  # batches consumed (skipped non-finite steps included)
    bad_in_row: int = 0
    skipped_total: int = 0
    last_saved: int = -1


class Trainer:
    """One run: the engine, the EMA, the run directory and the loop (``fit``)."""

    def __init__(self, cfg: Config, info: dist.DistInfo) -> None:
        from adpm_dist.models.registry import build_model

        self.cfg = cfg
        self.info = info
        self.device = dist.device_for(info)
        self.schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
        self.run = RunDir.create(cfg.train.run_dir, cfg.train.stage_dir, info.node_rank)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        try:
            model = build_model(cfg.model.preset, **cfg.model.options)
        except ValueError as exc:
            raise ConfigError(f"config key 'model': {exc}") from None
        self.model_config = dict(model.config)
        self.ema = EMA(model, cfg.train.ema_decay, warmup=cfg.train.ema_warmup)
        self.engine = build_engine(cfg, model, info.world_size)
        self.state = State()
        self.schedule_info = {
            "name": self.schedule.name,
            "num_timesteps": self.schedule.num_timesteps,
        }

    # -- checkpoints --------------------------------------------------------

    def _ema_bytes(self) -> bytes:
        from adpm_dist.models.io import model_to_bytes

        meta = {"schedule": self.schedule_info, "step": self.state.step, "run_dir": self.run.url}
        return model_to_bytes(self.ema.model, metadata=meta)

    def save(self) -> None:
        """Collective: DeepSpeed state → stage, upload, then ema, metrics, latest.json (last)."""
        step = self.state.step
        tag = checkpoint_tag(step)
        client = {
            "adpm_step": step,
            "adpm_bad_in_row": self.state.bad_in_row,
            "adpm_skipped_total": self.state.skipped_total,
            "adpm_ema_updates": self.ema.num_updates,
        }
        self.engine.save_checkpoint(
            self.run.stage_ckpt(), tag=tag, client_state=client, save_latest=False
        )
        ema_bytes = self._ema_bytes() if self.info.is_main else b""
        if self.info.is_main:
            storage.write_bytes(os.path.join(self.run.stage_ckpt(), tag, EMA_FILE), ema_bytes)
        dist.barrier()
        if self.run.remote and self.info.local_rank == 0:
            # Each node uploads what its ranks wrote (ZeRO shards are per rank).
            storage.upload_dir(
                os.path.join(self.run.stage_ckpt(), tag), self.run.join("ckpt", tag)
            )
        dist.barrier()
        if self.info.is_main:
            storage.write_bytes(self.run.join(EMA_FILE), ema_bytes)
            self.metrics.flush()
            latest = {
                "step": step,
                "ema": EMA_FILE,
                "deepspeed": f"ckpt/{tag}",
                "schedule": self.schedule_info,
                "model": self.model_config,
            }
            storage.write_text(self.run.join(LATEST), json.dumps(latest, indent=2) + "\n")
            self._prune_run(tag, keep_last=self.cfg.train.keep_ckpts)
        dist.barrier()
        if self.run.remote and self.info.local_rank == 0:
            self._prune_stage(keep=tag)
        self.state.last_saved = step

    def _prune_run(self, current: str, keep_last: int) -> None:
        """Keep ``current`` and the ``keep_last - 1`` checkpoints before it (0 keeps all).

        Runs after latest.json names ``current``. Folders newer than ``current`` (left by
        a run that crashed before its latest.json) are not counted and not touched.
        """
        if keep_last <= 0:
            return
        root = self.run.join("ckpt")
        tags = sorted(storage.basename(u.rstrip("/")) for u in storage.listdir(root))
        older = [t for t in tags if t.startswith("step_") and t < current]
        for tag in older[: max(0, len(older) - (keep_last - 1))]:
            storage.remove(storage.join(root, tag), recursive=True)

    def _prune_stage(self, keep: str) -> None:
        """Staged copies of older checkpoints are already uploaded: free the local disk."""
        root = self.run.stage_ckpt()
        if not os.path.isdir(root):
            return
        for name in os.listdir(root):
            if name != keep and name.startswith("step_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def resume(self) -> bool:
        """Load latest.json's checkpoint if there is one; True when resumed."""
        latest = read_latest(self.run)
        if latest is None:
            return False
        where = self.run.join(LATEST)
        if latest["schedule"] != self.schedule_info:
            raise ConfigError(
                f"{where}: run was trained with schedule {latest['schedule']}, config asks for "
                f"{self.schedule_info} (config keys 'diffusion.*'); use a new train.run_dir"
            )
        if latest["model"] != self.model_config:
            raise ConfigError(
                f"{where}: run was trained with model {latest['model']}, config builds "
                f"{self.model_config} (config keys 'model.*'); use a new train.run_dir"
            )
        tag = os.path.basename(latest["deepspeed"].rstrip("/"))
        local = os.path.join(self.run.stage_ckpt(), tag)
        if self.run.remote:
            if self.info.local_rank == 0:
                shutil.rmtree(local, ignore_errors=True)
                storage.download_dir(self.run.join(latest["deepspeed"]), local)
            dist.barrier()
        path, client = self.engine.load_checkpoint(
            self.run.stage_ckpt(), tag=tag, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise RuntimeError(f"{self.run.join(latest['deepspeed'])}: DeepSpeed could not load it")
        from adpm_dist.models.io import model_from_bytes

        with open(os.path.join(local, EMA_FILE), "rb") as fh:
            ema_model, _ = model_from_bytes(fh.read(), source=os.path.join(local, EMA_FILE))
        self.ema.load_tensors(ema_model.state_dict(), client["adpm_ema_updates"])
        self.state.step = int(client["adpm_step"])
        self.state.bad_in_row = int(client["adpm_bad_in_row"])
        self.state.skipped_total = int(client["adpm_skipped_total"])
        self.state.last_saved = self.state.step
        if self.state.step != int(latest["step"]):
            raise RuntimeError(f"{where}: step {latest['step']} but checkpoint has {self.state.step}")
        return True

    # -- one step -----------------------------------------------------------

    def step(self, x0: torch.Tensor) -> dict[str, Any]:
        """Forward, agree across ranks, backward + update unless the loss is not finite."""
        cfg, engine = self.cfg, self.engine
        x0 = x0.to(self.device, non_blocking=True)
        loss = training_loss(
            engine, x0, self.schedule, seed=cfg.train.seed, step=self.state.step,
            rank=self.info.rank, kind=cfg.train.loss,
        )
        # One all-reduce per step: the mean loss (NaN/inf on any rank poisons the sum, so
        # all ranks skip together) and the preemption flag (any rank ⇒ all ranks stop).
        shared = torch.tensor(
            [loss.detach().float().item(), 1.0 if preempt.requested() else 0.0],
            dtype=torch.float64,
        )
        dist.all_reduce_sum(shared)
        mean_loss = float(shared[0]) / self.info.world_size
        out: dict[str, Any] = {"loss": mean_loss, "preempt": bool(shared[1] > 0)}
        if not math.isfinite(mean_loss):
            self.state.bad_in_row += 1
            self.state.skipped_total += 1
            out["skipped"] = True
            if self.info.is_main:
                warnings.warn(
                    f"step {self.state.step}: non-finite loss ({mean_loss}); update skipped "
                    f"({self.state.bad_in_row} in a row)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return out
        engine.backward(loss)
        want_norm = (self.state.step + 1) % cfg.train.log_every == 0
        norm = grad_norm_zero0(engine) if want_norm and engine.zero_optimization_stage() == 0 \
            else None
        out["lr"] = float(engine.get_lr()[0])  # the rate this update uses
        engine.step()
        if norm is None and want_norm:
            g = engine.get_global_grad_norm()
            norm = float(g) if g is not None else None
        with full_parameters(engine):
            self.ema.update(list(engine.module.parameters()), list(engine.module.buffers()))
        self.state.bad_in_row = 0
        out["grad_norm"] = norm
        out["skipped"] = False
        return out

    # -- samples --------------------------------------------------------------

    def sample_grid(self) -> None:
        """A PNG grid of EMA samples (DDIM, even trajectory) on rank 0."""
        from PIL import Image

        from adpm_dist.diffusion.samplers import make_generators, sample
        from adpm_dist.diffusion.trajectory import even_trajectory

        cfg = self.cfg.train
        mc = self.model_config
        shape = (mc["in_channels"], mc["resolution"], mc["resolution"])
        model = self.ema.model
        k = min(cfg.sample_steps, self.schedule.num_timesteps)
        with torch.no_grad():
            imgs = sample(
                lambda x, n: model(x, n), self.schedule,
                even_trajectory(self.schedule.num_timesteps, k), "ddim",
                make_generators([self.cfg.train.seed * 100003 + i
                                 for i in range(cfg.sample_count)]),
                shape, device=self.device,
            )
        imgs = ((imgs.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        count, c, h, w = imgs.shape
        cols = int(math.ceil(math.sqrt(count)))
        rows = int(math.ceil(count / cols))
        grid = torch.zeros((c, rows * h, cols * w), dtype=torch.uint8)
        for i in range(count):
            r, q = divmod(i, cols)
            grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = imgs[i]
        arr = grid.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
        import io

        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        storage.write_bytes(
            self.run.join("samples", f"{checkpoint_tag(self.state.step)}.png"), buf.getvalue()
        )

    # -- the loop -------------------------------------------------------------

    def fit(self) -> int:
        cfg, info, state = self.cfg, self.info, self.state
        if info.is_main:
            storage.makedirs(self.run.url)
            storage.check_access(self.run.url)
        dist.barrier()
        resumed = self.resume()
        self.metrics = Metrics(self.run, state.step, enabled=info.is_main)
        if info.is_main:
            storage.write_text(self.run.join("config.yaml"), config_to_yaml(cfg))
            log.info("%s at step %d of %d in %s", "resumed" if resumed else "starting",
                     state.step, cfg.train.total_steps, self.run.url)
        if state.step >= cfg.train.total_steps:
            if not resumed:
                self.save()  # total_steps = 0: still leave a loadable run
            return 0
        stream, bpe = make_stream(cfg, self.model_config, info)
        batches = batches_from(stream, state.step, bpe)
        self.engine.train()
        t_last, step_last = time.perf_counter(), state.step
        with _progress(info.is_main and cfg.train.progress) as bar:
            task = bar.add_task("train", total=cfg.train.total_steps, completed=state.step)
            while state.step < cfg.train.total_steps:
                out = self.step(next(batches))
                state.step += 1
                bar.update(task, completed=state.step,
                           description=f"train loss {out['loss']:.4f}")
                if state.step % cfg.train.log_every == 0 or out["skipped"]:
                    now = time.perf_counter()
                    rate = (state.step - step_last) * cfg.data.batch_size / max(now - t_last, 1e-9)
                    t_last, step_last = now, state.step
                    finite = math.isfinite(out["loss"])
                    self.metrics.append({
                        "step": state.step, "loss": out["loss"] if finite else None,
                        "nonfinite_loss": None if finite else str(out["loss"]),
                        "lr": out.get("lr", float(self.engine.get_lr()[0])),
                        "grad_norm": out.get("grad_norm"), "images_per_s": rate,
                        "skipped": out["skipped"], "time": time.time(),
                    })
                if state.bad_in_row >= cfg.train.max_bad_steps:
                    self.save()
                    if info.is_main:
                        log.error("stopping: %d non-finite losses in a row at step %d; last "
                                  "good state saved", state.bad_in_row, state.step)
                    return DIVERGED_EXIT_CODE
                if out["preempt"]:
                    self.save()
                    if info.is_main:
                        log.warning("preempted (%s): checkpointed step %d; exit %d to requeue",
                                    ",".join(preempt.received()) or "peer", state.step,
                                    preempt.REQUEUE_EXIT_CODE)
                    return preempt.REQUEUE_EXIT_CODE
                if cfg.train.sample_every and state.step % cfg.train.sample_every == 0 \
                        and info.is_main:
                    self.sample_grid()
                if state.step % cfg.train.ckpt_every == 0:
                    self.save()
        if state.last_saved != state.step:
            self.save()
        return 0


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NullProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn())


# ---------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m adpm_dist.train",
        description="Train an ε-network with DeepSpeed (single process or under torchrun).",
    )
    p.add_argument("--config", help="YAML config (may name 'preset: NAME' as its base)")
    p.add_argument("--preset", help="a configs/NAME.yaml preset applied first")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def train(cfg: Config) -> int:
    """Run (or resume) training with a resolved config; returns the exit status."""
    prepare_deepspeed()
    info = dist.init_group()
    try:
        with preempt.PreemptionHandler():
            trainer = Trainer(cfg, info)
            return trainer.fit()
    finally:
        dist.shutdown()
        forget_deepspeed_groups()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = build_config(args.config, args.overrides, preset=args.preset)
        return train(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
