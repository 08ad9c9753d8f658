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
    metrics/NNNNNNNN.jsonl   one JSON object per logged step, one part per checkpoint
                             segment (after step NNNNNNNN); read them with run_dir.read_metrics
    samples/step_XXXXXXXX.png  optional sample grids
    latest.json              written LAST; rerunning resumes from it

Exit status: 0 done; ``preempt.REQUEUE_EXIT_CODE`` (75) checkpointed after
SIGUSR1/SIGTERM, requeue me; ``DIVERGED_EXIT_CODE`` (3) stopped after
``train.max_bad_steps`` non-finite losses in a row (last good state saved);
2 bad configuration.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.errors import UserArgumentParser, raised_by_check, run_cli
from adpm_dist.io import collective, dist, preempt, storage
from adpm_dist.io.collective import together
from adpm_dist.io.quality import BadDataError
from adpm_dist.train import checkpoint
from adpm_dist.train.batches import batches_from, check_data, make_stream
from adpm_dist.train.config import Config, ConfigError, build_config, config_to_yaml
from adpm_dist.train.ema import EMA
from adpm_dist.train.ema_sharded import bind_ema
from adpm_dist.train.engine import (
    build_engine,
    forget_deepspeed_groups,
    grad_norm_zero0,
    per_rank_batch,
    prepare_deepspeed,
)
from adpm_dist.train.grid import sample_grid_png
from adpm_dist.train.objective import training_loss
from adpm_dist.train.progress import progress
from adpm_dist.train.run_dir import Metrics, RunDir, checkpoint_tag, read_latest
from adpm_dist.train.usage import build_parser, check_argv

__all__ = ["Trainer", "batches_from", "check_argv", "main", "make_schedule", "make_stream", "train"]

DIVERGED_EXIT_CODE = 3
CONFIG_ERROR_EXIT_CODE = 2

log = logging.getLogger("adpm_dist.train.loop")


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

    def __init__(self, cfg: Config, info: dist.DistInfo, check_shards: bool = True) -> None:
        """``check_shards`` False skips the data check (tools/bench_train.py feeds its own batches)."""
        from adpm_dist.models.registry import build_model

        self.cfg = cfg
        self.info = info
        self.device = dist.device_for(info)
        self.schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
        self.run = RunDir.create(cfg.train.run_dir, cfg.train.stage_dir, info.node_rank)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        try:
            model = build_model(cfg.model.preset, **cfg.model.options)
        except ValueError as exc:  # the registry's checks of the preset and its options
            if not raised_by_check(exc, "adpm_dist.models"):
                raise
            raise ConfigError(f"config key 'model': {exc}") from None
        self.model_config = dict(model.config)
        latest = read_latest(self.run)
        if check_shards and (latest is None or int(latest["step"]) < cfg.train.total_steps):
            check_data(cfg, self.model_config)  # before the engine: a mismatch costs nothing
        # The EMA copies the full weights before the engine (ZeRO-3 partitions them), then moves
        # where DeepSpeed put the module: updates and sample grids stay on that device.
        self.ema = EMA(model, cfg.train.ema_decay, warmup=cfg.train.ema_warmup)
        self.engine = build_engine(cfg, model, info.world_size)
        # Fed from DeepSpeed's fp32 master weights (not bf16 ones); sharded under ZeRO-3 and
        # bf16 ZeRO-1/2 (each rank averages its own piece of them).
        self.ema = bind_ema(self.ema, self.engine)
        self.state = State()
        self.schedule_info = {
            "name": self.schedule.name,
            "num_timesteps": self.schedule.num_timesteps,
        }

    # -- one step -----------------------------------------------------------

    def save(self) -> None:
        """Collective: checkpoint this step (see :func:`adpm_dist.train.checkpoint.save`)."""
        checkpoint.save(self)

    def resume(self) -> bool:
        """Load latest.json's checkpoint if there is one; True when resumed."""
        return checkpoint.resume(self)

    def sample_grid(self) -> None:
        """A PNG grid of EMA samples (DDIM, even trajectory) on rank 0."""
        cfg = self.cfg.train
        model = self.ema.model.to(self.device)  # a sharded EMA assembles on the host
        try:
            png = sample_grid_png(model, self.schedule, self.model_config,
                                  steps=cfg.sample_steps, count=cfg.sample_count, seed=cfg.seed,
                                  device=self.device)
        finally:
            if self.ema.sharded:
                model.to("cpu")
        storage.write_bytes(
            self.run.join("samples", f"{checkpoint_tag(self.state.step)}.png"), png
        )

    def step(self, x0: torch.Tensor | None, bad_data: bool = False,
             failure: BaseException | None = None) -> dict[str, Any]:
        """Forward, agree across ranks, backward + update unless the loss is not finite or a
        rank has no real batch (``bad_data``: then every rank returns ``bad_data`` True).

        ``failure``: this rank's step already failed (its batch); it still joins the
        agreement, which then raises on every rank (:func:`collective.raise_failures`)."""
        cfg, engine = self.cfg, self.engine
        loss = None
        if failure is None:
            try:
                loss = training_loss(
                    engine, x0.to(self.device, non_blocking=True), self.schedule, seed=cfg.train.seed,
                    step=self.state.step, rank=self.info.rank, kind=cfg.train.loss,
                )
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the peers
                failure = exc
        shared = self.agree(loss, bad_data, failure)
        mean_loss = float(shared[0]) / self.info.world_size
        out: dict[str, Any] = {"loss": mean_loss, "preempt": bool(shared[1] > 0),
                               "bad_data": bool(shared[2] > 0)}
        if out["bad_data"]:
            return out
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
        self.ema.update()  # from the fp32 master weights (bind_ema): no gather, no host copy
        self.state.bad_in_row = 0
        out["grad_norm"] = norm
        out["skipped"] = False
        return out

    def agree(self, loss: torch.Tensor | None, bad_data: bool, failure: BaseException | None):
        """The step's ONE all-reduce, on the device: (loss, preempt, bad data, failed flag per
        rank). NaN/inf on any rank poisons the loss sum, so all ranks skip together; preempt
        or bad data on any rank stops all ranks; a failure on any rank raises on every rank.
        The loss never leaves the device on its own (no ``.item()``): the one host read is
        of the reduced vector, which the skip, stop and failure decisions need each step."""
        world, device = self.info.world_size, dist.collective_device()
        flags = torch.zeros(3 + world, dtype=torch.float64)
        flags[1], flags[2] = float(preempt.requested()), float(bad_data)
        if failure is not None:
            flags[3 + self.info.rank] = 1.0
        shared = flags.to(device, non_blocking=True)
        if loss is not None:
            shared[0] = loss.detach().to(device=device, dtype=torch.float64)
        collective.arrive()
        dist.all_reduce_sum(shared)
        collective.progress()
        shared = shared.cpu()
        collective.raise_failures(shared[3:].numpy(), failure)
        return shared

    # -- the loop -------------------------------------------------------------

    def fit(self) -> int:
        cfg, info, state = self.cfg, self.info, self.state
        together(lambda: (storage.makedirs(self.run.url), storage.check_access(self.run.url)),
                 rank0_only=True)
        resumed = self.resume()
        self.metrics = Metrics(self.run, state.step, enabled=info.is_main)

        def start() -> None:
            storage.write_text(self.run.join("config.yaml"), config_to_yaml(cfg))
            log.info("%s at step %d of %d in %s", "resumed" if resumed else "starting",
                     state.step, cfg.train.total_steps, self.run.url)

        together(start, rank0_only=True)
        if state.step >= cfg.train.total_steps:
            if not resumed:
                self.save()  # total_steps = 0: still leave a loadable run
            return 0
        stream, bpe = together(lambda: make_stream(cfg, self.model_config, info))
        batches = batches_from(stream, state.step, bpe)
        self.engine.train()
        self.rate_mark = (time.perf_counter(), state.step)
        with progress(info.is_main and cfg.train.progress) as bar:
            task = bar.add_task("train", total=cfg.train.total_steps, completed=state.step)
            while state.step < cfg.train.total_steps:
                x0, bad, failure = self.next_batch(batches)
                out = self.step(x0, bad_data=bad is not None, failure=failure)
                if out["bad_data"]:
                    self.save()  # the batches so far were good: keep them (exit 2 follows)
                    collective.stop()  # every rank raises its own line: no store report
                    raise stopped_on_bad_data(bad, state.step)
                state.step += 1
                bar.update(task, completed=state.step,
                           description=f"train loss {out['loss']:.4f}")
                self.log_step(out)
                code = self.after_step(out)
                if code is not None:
                    return code
        if state.last_saved != state.step:
            self.save()
        return 0

    def next_batch(self, batches: Iterator[torch.Tensor]
                   ) -> tuple[torch.Tensor | None, Exception | None, BaseException | None]:
        """(batch, bad input, failure): the next batch; when the data layer gives up on bad
        input a stand-in of the same shape and that error; any other failure (a reader's bug,
        the test hook ``ADPM_TEST_FAIL_RANK=R:K[:mode]`` at step K) comes back as ``failure``.
        This step's collectives must still run on every rank."""
        try:
            collective.injected_fault(self.info.rank, self.state.step)
            return next(batches), None, None
        except BadDataError as exc:
            c, r = self.model_config["in_channels"], self.model_config["resolution"]
            return torch.zeros(per_rank_batch(self.cfg, self.info.world_size), c, r, r), exc, None
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the peers
            return None, None, exc

    def log_step(self, out: dict[str, Any]) -> None:
        cfg, state = self.cfg, self.state
        if state.step % cfg.train.log_every and not out["skipped"]:
            return
        now = time.perf_counter()
        t_last, step_last = self.rate_mark
        rate = (state.step - step_last) * cfg.data.batch_size / max(now - t_last, 1e-9)
        self.rate_mark = (now, state.step)
        finite = math.isfinite(out["loss"])
        self.metrics.append({
            "step": state.step, "loss": out["loss"] if finite else None,
            "nonfinite_loss": None if finite else str(out["loss"]),
            "lr": out.get("lr", float(self.engine.get_lr()[0])),
            "grad_norm": out.get("grad_norm"), "images_per_s": rate,
            "skipped": out["skipped"], "time": time.time(),
        })

    def after_step(self, out: dict[str, Any]) -> int | None:
        """Stop (divergence, preemption: the exit status), sample a grid, checkpoint."""
        cfg, info, state = self.cfg, self.info, self.state
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
        if cfg.train.sample_every and state.step % cfg.train.sample_every == 0:
            with collective.slow():
                self.ema.sync(list(self.engine.module.buffers()))  # collective when sharded
                together(self.sample_grid, rank0_only=True)
        if state.step % cfg.train.ckpt_every == 0:
            self.save()
        return None


def stopped_on_bad_data(exc: Exception | None, step: int) -> BadDataError:
    """The one-line error of a run that bad input stopped (on this rank or another one)."""
    where = f"training stopped at step {step} (checkpointed: rerun to resume from it)"
    if exc is None:
        return BadDataError(f"{where}: bad input on another rank (see its error)")
    # A DataLoader worker's error comes back with its traceback in the message: keep the
    # error's own last line.
    lines = [x for x in str(exc).splitlines() if x.strip()]
    text = lines[-1].split("BadDataError: ", 1)[-1] if lines else type(exc).__name__
    return BadDataError(f"{where}: {text}")


# ---------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags alone (``check_argv`` also merges the config they name)."""
    return build_parser(UserArgumentParser).parse_args(argv)


def train(cfg: Config) -> int:
    """Run (or resume) training with a resolved config; returns the exit status.

    Failures follow :mod:`adpm_dist.io.collective`'s protocol: with several ranks a failing
    rank prints its error and leaves with ``os._exit`` (no barrier), its peers print
    ``error: rank N failed: …``; a rank stuck longer than ``train.collective_timeout``
    (or ``$ADPM_COLLECTIVE_TIMEOUT``; 0 = auto) is named and ends the job.
    """
    prepare_deepspeed()
    timeout = collective.timeout_from(cfg.train.collective_timeout)
    info = dist.init_group(max(collective.SLOW_TIMEOUT_S, timeout + 60.0))
    collective.start(timeout)

    def run() -> int:
        with preempt.PreemptionHandler():
            return Trainer(cfg, info).fit()

    try:
        status = collective.run_protected(run)
    except BaseException:  # one process: free the group for the next run in this process
        collective.stop()
        dist.shutdown(barrier=False)
        forget_deepspeed_groups()
        raise
    collective.shutdown()
    forget_deepspeed_groups()
    return status


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)  # what check_argv (the launcher's check) does, then the run
    cfg = build_config(args.config, args.overrides, preset=args.preset)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return train(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Bad flags or config (ConfigError) → one ``error:`` line, exit 2; bugs keep their traceback."""
    return run_cli(_main, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
