"""The EMA under ZeRO-3 (and bf16 ZeRO-1/2), sharded like the fp32 master weights it follows.

ZeRO-3 keeps on each rank only its partition of every parameter (DeepSpeed's ``p.ds_tensor``:
elements [r·P, (r+1)·P) of the flattened parameter, zero-padded to W·P). :class:`ShardedEMA`
keeps the EMA of exactly that partition, in fp32, on the partition's device, so an update is
one local lerp per tensor: no all-gather of the full weights per step (which the unsharded
EMA needs under ZeRO-3) and 1/W of its memory on the device. The full EMA weights are
assembled only when something reads them, by :meth:`ShardedEMA.sync` (a collective: one
all-gather per tensor), into a host copy of the network: before a checkpoint and before a
sample grid. What it computes is the same θ_ema ← d θ_ema + (1 − d) θ, element for element,
as :class:`adpm_dist.train.ema.EMA` on the gathered weights.

What is averaged is DeepSpeed's fp32 master partition (:func:`adpm_dist.train.engine.master_weights`),
not ``ds_tensor``, which under bf16 holds the bf16-rounded weights. Under bf16 ZeRO-1/2 the
optimizer likewise keeps on each rank a contiguous fp32 *fragment* of each flattened parameter
(possibly empty): :class:`FragmentEMA` averages those and assembles with one all-reduce of
the zero-filled fragments (exact: each element has one non-zero contribution).
:func:`bind_ema` picks the EMA for an engine and binds it to those master weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as torch_dist

from adpm_dist.train.ema import EMA
from adpm_dist.train.engine import master_layout, master_offsets, master_weights, module_device


def _partition(param: torch.nn.Parameter) -> torch.Tensor:
    part = getattr(param, "ds_tensor", None)
    if part is None:
        raise ValueError("ShardedEMA needs ZeRO-3 partitioned parameters (no ds_tensor on a parameter)")
    return part


def _group(param: torch.nn.Parameter):
    return getattr(param, "ds_process_group", None)


def _own_slice(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's partition of ``full`` (the parameter's full value), zero-padded like ZeRO-3."""
    part = _partition(param)
    size, rank = part.numel(), torch_dist.get_rank(_group(param))
    flat = full.detach().reshape(-1).to(torch.float32)
    out = torch.zeros(size, dtype=torch.float32, device=part.device)
    lo, hi = min(rank * size, flat.numel()), min((rank + 1) * size, flat.numel())
    out[: hi - lo] = flat[lo:hi].to(part.device)
    return out


class ShardedEMA(EMA):
    """An :class:`EMA` whose running average lives in per-rank ZeRO-3 partitions.

    ``self.model`` is a host copy that holds the full weights after :meth:`sync` (and the
    buffers); between syncs its parameters are stale. Built from the EMA the trainer made
    before DeepSpeed partitioned the model, and the engine's (partitioned) parameters.
    """

    sharded = True

    def __init__(self, full: EMA, params: list[torch.nn.Parameter],
                 masters: Callable[[], list[torch.Tensor]] | None = None) -> None:  # noqa: D107
        """``masters`` gives this rank's fp32 master partitions (default: the ``ds_tensor``s)."""
        self.decay, self.warmup, self.num_updates = full.decay, full.warmup, full.num_updates
        self.source = None
        self.model = full.model.to("cpu")
        mine = list(self.model.parameters())
        if len(mine) != len(params):
            raise ValueError(f"EMA has {len(mine)} parameters, the engine {len(params)}")
        self.params = params
        self.masters = masters or (lambda: [_partition(p) for p in self.params])
        self.shards = [_own_slice(m, p) for m, p in zip(mine, params)]

    def to(self, device: torch.device | str) -> ShardedEMA:
        """The shards stay with their partitions and the assembled copy on the host."""
        return self

    @property
    def device(self) -> torch.device:
        return self.shards[0].device if self.shards else torch.device("cpu")

    @torch.no_grad()
    def update(self, params: list[torch.Tensor] | None = None,
               buffers: list[torch.Tensor] | None = None) -> None:
        """One step from the local fp32 master partitions (``params``: ZeRO-3 parameters whose
        ``ds_tensor`` to read instead); the buffers, never partitioned, are copied at :meth:`sync`."""
        d = self.current_decay()
        parts = self.masters() if params is None else [_partition(p) for p in params]
        for shard, part in zip(self.shards, parts, strict=True):
            shard.lerp_(part.detach().to(torch.float32), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def sync(self, buffers: list[torch.Tensor] | None = None) -> None:
        """Collective: assemble the full EMA weights (and copy ``buffers``) into ``self.model``."""
        for target, shard, p in zip(self.model.parameters(), self.shards, self.params):
            group = _group(p)
            pieces = [torch.empty_like(shard) for _ in range(torch_dist.get_world_size(group))]
            torch_dist.all_gather(pieces, shard, group=group)
            flat = torch.cat(pieces)[: target.numel()]
            target.copy_(flat.view_as(target).to(target.device))
        _copy_buffers(self.model, buffers)

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        """Resume: the full EMA weights of a checkpoint, re-partitioned for this world size."""
        super().load_tensors(tensors, num_updates)
        self.shards = [_own_slice(m, p) for m, p in zip(self.model.parameters(), self.params)]


@torch.no_grad()
def _copy_buffers(model: torch.nn.Module, buffers: list[torch.Tensor] | None) -> None:
    """Buffers (e.g. norm statistics) are not averaged: the EMA copy takes the live ones."""
    if buffers is not None:
        for ema_b, b in zip(model.buffers(), buffers):
            ema_b.copy_(b.detach().to(ema_b.device))


class FragmentEMA(EMA):
    """The EMA of this rank's fp32 master fragments (bf16 under ZeRO-1/2): fragment i covers
    elements [offsets[i], offsets[i] + len) of flattened parameter i. ``self.model`` (host)
    holds the full weights after :meth:`sync`."""

    sharded = True

    def __init__(self, full: EMA, masters: Callable[[], list[torch.Tensor]], offsets: list[int],
                 group=None, device: torch.device | None = None) -> None:  # noqa: D107
        """``device``: where the fragments live (the all-reduce's device; a rank may own none)."""
        self.decay, self.warmup, self.num_updates = full.decay, full.warmup, full.num_updates
        self.source = None
        self.model = full.model.to("cpu")
        self.masters, self.offsets, self.group = masters, list(offsets), group
        self._device = device
        self._slice_model()

    def _slice_model(self) -> None:
        frags = self.masters()
        mine = list(self.model.parameters())
        if len(mine) != len(frags):
            raise ValueError(f"EMA has {len(mine)} parameters, the engine {len(frags)}")
        self.shards = [m.detach().reshape(-1)[o: o + f.numel()].to(f.device, torch.float32).clone()
                       for m, f, o in zip(mine, frags, self.offsets)]

    def to(self, device: torch.device | str) -> FragmentEMA:
        """The shards stay with their fragments and the assembled copy on the host."""
        return self

    @property
    def device(self) -> torch.device:
        return self._device or next((s.device for s in self.shards if s.numel()), torch.device("cpu"))

    @torch.no_grad()
    def update(self, params: list[torch.Tensor] | None = None,
               buffers: list[torch.Tensor] | None = None) -> None:
        """One step from the local fp32 master fragments (``params``: fragments to read instead)."""
        d = self.current_decay()
        for shard, frag in zip(self.shards, self.masters() if params is None else params, strict=True):
            shard.lerp_(frag.detach().to(torch.float32), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def sync(self, buffers: list[torch.Tensor] | None = None) -> None:
        """Collective: one all-reduce of the zero-filled fragments assembles ``self.model``."""
        mine = list(self.model.parameters())
        flat = torch.zeros(sum(m.numel() for m in mine), dtype=torch.float32, device=self.device)
        start = 0
        for m, shard, o in zip(mine, self.shards, self.offsets):
            flat[start + o: start + o + shard.numel()] = shard.to(flat.device)
            start += m.numel()
        if torch_dist.is_initialized():
            torch_dist.all_reduce(flat, group=self.group)
        start = 0
        for m in mine:
            m.copy_(flat[start: start + m.numel()].view_as(m).to(m.device))
            start += m.numel()
        _copy_buffers(self.model, buffers)

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        """Resume: the full EMA weights of a checkpoint, cut into this rank's fragments."""
        super().load_tensors(tensors, num_updates)
        self._slice_model()


def bind_ema(ema: EMA, engine) -> EMA:
    """The EMA the trainer updates (``ema.update()``), fed from the engine's fp32 master weights.

    ``ema`` was copied from the full fp32 model before DeepSpeed wrapped it. ZeRO-3: a
    :class:`ShardedEMA` of the master partitions; bf16 ZeRO-1/2: a :class:`FragmentEMA`;
    otherwise ``ema`` itself, moved next to the module and reading the full masters (bf16
    ZeRO-0) or the module's own fp32 parameters."""
    params = list(engine.module.parameters())
    layout = master_layout(engine)
    if layout == "partition":
        return ShardedEMA(ema, params, lambda: master_weights(engine))
    if layout == "fragment":
        return FragmentEMA(ema, lambda: master_weights(engine), master_offsets(engine),
                           getattr(engine.optimizer, "dp_process_group", None), module_device(engine))
    ema.to(module_device(engine))
    ema.source = lambda: (master_weights(engine), list(engine.module.buffers()))
    return ema
