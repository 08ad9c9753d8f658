"""The DeepSpeed engine that training runs on: environment, JSON config, checkpoint safety.

DeepSpeed wraps the model on every path (one process included): ZeRO stage from the
config, fp32 on CPU and bf16 on GPU, torch AdamW with explicit weight decay, a linear
learning-rate warm-up and gradient clipping. Under bf16 the module's weights are bf16 while
DeepSpeed's optimizer keeps the fp32 master weights it updates (:func:`master_weights` finds
them; the EMA averages those), and gradients are reduced in fp32 (``communication_data_type``).
Its checkpoints are loaded with ``weights_only=True`` (a small allow-list of DeepSpeed's data
classes), never by unpickling arbitrary objects. The CPU traps this works around are in docs/train.md.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from adpm_dist.train.config import Config, ConfigError


def prepare_deepspeed() -> None:
    """Environment DeepSpeed needs before its import (see docs/train.md)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    # The shm all-reduce op is a 35 s JIT build on CPU and only helps large intra-node
    # CPU jobs; gloo is what we measured and test.
    if os.environ.get("ADPM_DS_SHM", "0") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)


def forget_deepspeed_groups() -> None:
    """Drop DeepSpeed's module-level caches of process groups after the group is destroyed.

    DeepSpeed caches the data-parallel groups and its comm backend in module globals;
    a second run in the same process (tests, notebooks, launchers calling ``main``)
    would otherwise use groups of a destroyed default group.
    """
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    ds_comm.cdb = None
    for name, value in list(vars(ds_groups).items()):
        if not (name.startswith("_") and name[1:2].isupper()):
            continue
        if isinstance(value, dict):
            setattr(ds_groups, name, {})
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            setattr(ds_groups, name, None)
        elif name.startswith("_MPU_"):
            setattr(ds_groups, name, None)


def use_bf16(cfg: Config) -> bool:
    if cfg.train.precision == "bf16":
        return True
    if cfg.train.precision == "fp32":
        return False
    return torch.cuda.is_available()


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run."""
    per_rank = per_rank_batch(cfg, world_size)
    return {
        "train_batch_size": per_rank * world_size,
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
                # Explicit: with torch_adam DeepSpeed would otherwise use torch's 0.01.
                "weight_decay": cfg.optim.weight_decay,
                # torch.optim.AdamW instead of JIT-compiling FusedAdam (88 s on CPU).
                "torch_adam": True,
            },
        },
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": use_bf16(cfg)},
        # Reduce gradients in fp32 (DeepSpeed's default under bf16 is bf16): ZeRO-0 casts each
        # bucket to fp32 for the all-reduce, ZeRO-1/2/3 reduce(-scatter) in fp32.
        "communication_data_type": "fp32",
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def per_rank_batch(cfg: Config, world_size: int) -> int:
    if cfg.data.batch_size % world_size:
        raise ConfigError(
            f"config key 'data.batch_size' ({cfg.data.batch_size}) is the global batch and must "
            f"be divisible by the world size ({world_size})"
        )
    return cfg.data.batch_size // world_size


def warmup_factor(warmup_steps: int):
    """lr multiplier after k optimizer steps: linear from 1/W to 1 over W steps."""

    def factor(k: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (k + 1) / warmup_steps)

    return factor


def _deepspeed_safe_globals() -> list:
    """The data-only DeepSpeed classes its ZeRO checkpoints pickle (found by loading
    stage 0-3 and bf16 checkpoints with ``weights_only=True``). Nothing callable."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _safe_checkpoint_engine(engine) -> None:
    """Make DeepSpeed load its checkpoints with ``weights_only=True`` (no arbitrary unpickling)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    current = engine.checkpoint_engine
    if not isinstance(current, TorchCheckpointEngine):
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(current).__name__}")

    allowed = _deepspeed_safe_globals()

    class WeightsOnlyCheckpointEngine(type(current)):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    current.__class__ = WeightsOnlyCheckpointEngine


def build_engine(cfg: Config, model: torch.nn.Module, world_size: int):
    """deepspeed.initialize with our config and a LambdaLR warm-up; returns the engine
    (its module compiled by torch.compile when ``train.compile``)."""
    import deepspeed

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(cfg.optim.warmup_steps))

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size),
    )
    _safe_checkpoint_engine(engine)
    if cfg.train.compile:  # nn.Module.compile in place: parameter names and checkpoints unchanged
        engine.compile()
    return engine


def full_parameters(engine):
    """Context giving full parameters (ZeRO-3 gathers them; other stages have them)."""
    import contextlib

    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
    return contextlib.nullcontext()


def module_device(engine) -> torch.device:
    """Where DeepSpeed placed the module's weights (under ZeRO-3 their local partitions)."""
    return next(engine.module.parameters()).device


def grad_norm_zero0(engine) -> float:
    """‖g‖ of the (already averaged) gradients under ZeRO-0, where DeepSpeed keeps none."""
    total = torch.zeros((), dtype=torch.float64, device=module_device(engine))
    for p in engine.module.parameters():
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum()  # on device: one sync, below
    return float(total.sqrt())


def master_layout(engine) -> str:
    """How this rank holds the fp32 weights the optimizer updates (see :func:`master_weights`):
    ``module`` (fp32 training: the module's own parameters, full on every rank), ``full`` (bf16
    under ZeRO-0: a full fp32 copy of every parameter), ``fragment`` (bf16 under ZeRO-1/2: a
    contiguous piece of each flattened parameter, possibly empty) or ``partition`` (ZeRO-3:
    this rank's zero-padded partition of each flattened parameter, like ``ds_tensor``)."""
    if engine.zero_optimization_stage() == 3:
        return "partition"
    if not engine.bfloat16_enabled():
        return "module"
    return "full" if engine.zero_optimization_stage() == 0 else "fragment"


def master_weights(engine) -> list[torch.Tensor]:
    """This rank's fp32 master values of every parameter of ``engine.module``, in its order:
    views into DeepSpeed's optimizer state (no copy, no collective, no host sync), shaped as
    :func:`master_layout` says. ``deepspeed.utils.safe_get_full_fp32_param`` assembles the same
    values with one collective per parameter (tests/test_bf16_master.py checks they agree)."""
    params = list(engine.module.parameters())
    layout, opt = master_layout(engine), engine.optimizer
    if layout == "module":
        return params
    if layout == "partition":
        out = []
        for p in params:
            group, offset, numel = opt.grad_position[opt.get_param_id(p)]
            out.append(opt.fp32_partitioned_groups_flat[group].narrow(0, offset, numel))
        return out
    if layout == "fragment":
        return [p._hp_mapping.get_hp_fragment() if p._hp_mapping is not None
                else torch.empty(0, dtype=torch.float32, device=p.device) for p in params]
    if not hasattr(opt, "fp32_groups"):  # FusedAdam's FP16_Optimizer: never built here
        raise RuntimeError(f"no per-parameter fp32 master weights in {type(opt).__name__}")
    hp = {id(lp): m for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, m in zip(lps, hps)}
    return [hp[id(p)] for p in params]


def master_offsets(engine) -> list[int]:
    """Where each tensor of :func:`master_weights` starts in its flattened parameter."""
    params = list(engine.module.parameters())
    layout = master_layout(engine)
    if layout == "fragment":
        return [p._hp_mapping.lp_fragment_address.start if p._hp_mapping is not None else 0
                for p in params]
    if layout == "partition":
        return [p.ds_tensor.numel() * torch.distributed.get_rank(p.ds_process_group) for p in params]
    return [0] * len(params)
