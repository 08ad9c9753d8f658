"""What loading a checkpoint gives: the model, its schedule and digest (any source)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adpm_dist.diffusion.schedule import Schedule
from adpm_dist.errors import UserError
from adpm_dist.io import storage


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be found or used; the message names it."""


@dataclass
class LoadedModel:
    model: nn.Module
    schedule: Schedule
    digest: str
    name: str
    source: str

    def describe(self) -> dict:
        return {"digest": self.digest, "name": self.name, "source": storage.redact(self.source)}
