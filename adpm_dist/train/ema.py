"""Exponential moving average of model weights, kept in fp32.

The EMA lives in its own copy of the network (``EMA.model``) so it can be
saved with ``models.io.model_to_bytes`` and loaded by the later stages as an
ordinary model. It lives on the device of the weights it follows (``to``: the
trainer moves it next to the engine's module once DeepSpeed has placed that),
so an update is one on-device lerp per tensor and never a host copy. Each update
reads the *full* fp32 training weights: the trainer binds it (``source``, set by
:func:`adpm_dist.train.ema_sharded.bind_ema`) to DeepSpeed's fp32 master weights, which
under bf16 are not the module's bf16-rounded weights. Under ZeRO-3 (and bf16 under ZeRO-1/2)
the trainer uses :mod:`adpm_dist.train.ema_sharded` instead, which averages each rank's own
piece of the fp32 master weights and so never gathers them per step (docs/train.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


class EMA:
    """θ_ema ← d θ_ema + (1 − d) θ, with optional warm-up d_k = min(d, (1 + k) / (10 + k))."""

    sharded = False  # the full weights are always current in self.model (see sync)

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        # () -> (params, buffers) the argument-less update reads (bind_ema sets it).
        self.source: Callable[[], tuple[list[torch.Tensor], list[torch.Tensor] | None]] | None = None
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def to(self, device: torch.device | str) -> EMA:
        """Move the EMA weights (once, e.g. next to the engine's module); returns self."""
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def current_decay(self) -> float:
        if self.warmup:
            k = self.num_updates
            return min(self.decay, (1.0 + k) / (10.0 + k))
        return self.decay

    @torch.no_grad()
    def update(self, params: list[torch.Tensor] | None = None,
               buffers: list[torch.Tensor] | None = None) -> None:
        """One step; ``params`` in the order of ``self.model.parameters()`` (None: from ``source``)."""
        if params is None:
            if self.source is None:
                raise ValueError("EMA.update() without weights needs a bound source (bind_ema)")
            params, buffers = self.source()
        d = self.current_decay()
        mine = list(self.model.parameters())
        if len(mine) != len(params):
            raise ValueError(f"EMA has {len(mine)} parameters, update got {len(params)}")
        for ema_p, p in zip(mine, params):
            if p.device != ema_p.device:  # a host copy per step per tensor: never silently
                raise ValueError(f"EMA on {ema_p.device} but the weights are on {p.device}; move it (EMA.to)")
            ema_p.lerp_(p.detach().to(torch.float32), 1.0 - d)
        if buffers is not None:
            for ema_b, b in zip(self.model.buffers(), buffers):
                ema_b.copy_(b.detach())
        self.num_updates += 1

    def sync(self, buffers: list[torch.Tensor] | None = None) -> None:
        """Make ``self.model`` current before it is read (here it always is; see ShardedEMA)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """fp32 weights by state-dict name (what goes into ema.safetensors)."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = self.model.load_state_dict(tensors, strict=True)
        del missing
        self.num_updates = int(num_updates)
