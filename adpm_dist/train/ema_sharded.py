"""The EMA under ZeRO-3, sharded like the weights it follows.

ZeRO-3 keeps on each rank only its partition of every parameter (DeepSpeed's ``p.ds_tensor``:
elements [r·P, (r+1)·P) of the flattened parameter, zero-padded to W·P). :class:`ShardedEMA`
keeps the EMA of exactly that partition, in fp32, on the partition's device, so an update is
one local lerp per tensor: no all-gather of the full weights per step (which the unsharded
EMA needs under ZeRO-3) and 1/W of its memory on the device. The full EMA weights are
assembled only when something reads them, by :meth:`ShardedEMA.sync` (a collective: one
all-gather per tensor), into a host copy of the network: before a checkpoint and before a
sample grid. What it computes is the same θ_ema ← d θ_ema + (1 − d) θ, element for element,
as :class:`adpm_dist.train.ema.EMA` on the gathered weights.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist

from adpm_dist.train.ema import EMA


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

    def __init__(self, full: EMA, params: list[torch.nn.Parameter]) -> None:  # noqa: D107
        self.decay, self.warmup, self.num_updates = full.decay, full.warmup, full.num_updates
        self.model = full.model.to("cpu")
        mine = list(self.model.parameters())
        if len(mine) != len(params):
            raise ValueError(f"EMA has {len(mine)} parameters, the engine {len(params)}")
        self.params = params
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
        """One step from the local partitions (``params`` defaults to the engine's); the
        buffers, never partitioned, are copied at :meth:`sync`."""
        d = self.current_decay()
        params = self.params if params is None else params
        for shard, p in zip(self.shards, params):
            shard.lerp_(_partition(p).detach().to(torch.float32), 1.0 - d)
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
        if buffers is not None:
            for ema_b, b in zip(self.model.buffers(), buffers):
                ema_b.copy_(b.detach().to(ema_b.device))

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        """Resume: the full EMA weights of a checkpoint, re-partitioned for this world size."""
        super().load_tensors(tensors, num_updates)
        self.shards = [_own_slice(m, p) for m, p in zip(self.model.parameters(), self.params)]
