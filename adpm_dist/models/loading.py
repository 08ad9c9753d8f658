"""Load an ε-network for inference from a run directory, a weights file or an adapter.

Accepted specs (local paths, ``file://`` or ``s3://``):

- a training run directory (has ``latest.json``): its EMA weights;
- a ``.safetensors`` file written by :mod:`adpm_dist.models.io`;
- ``diffusers:PATH``: a diffusers ``UNet2DModel`` folder (optional extra).

Every loaded model comes with the schedule it was trained under, a digest
that Γ files and sample metadata record, and a callable ε-function that casts
to the model's device and dtype at the point of use.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from adpm_dist.diffusion.samplers import EpsFn
from adpm_dist.diffusion.schedule import Schedule, schedule_from_description
from adpm_dist.io import storage
from adpm_dist.models.io import model_digest, model_from_bytes
from adpm_dist.models.loaded import CheckpointError, LoadedModel
from adpm_dist.models.registry import model_name


def _resolve_weights(spec: str) -> tuple[str, dict]:
    latest = storage.join(spec, "latest.json")
    if storage.exists(latest):
        try:
            meta = json.loads(storage.read_text(latest))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{latest}: not valid JSON ({exc})") from None
        if "ema" not in meta:
            raise CheckpointError(f"{latest}: no 'ema' entry (is the run finished checkpointing?)")
        return storage.join(spec, meta["ema"]), meta
    if storage.exists(spec) and not storage.isdir(spec):
        return spec, {}
    raise CheckpointError(f"{spec}: neither a run directory with latest.json nor a weights file")


def load_checkpoint(spec: str) -> LoadedModel:
    """Load the model behind ``spec`` on the CPU in eval mode (see module docstring)."""
    if spec.startswith("diffusers:"):
        from adpm_dist.models.diffusers_adapter import load_diffusers

        return load_diffusers(spec[len("diffusers:"):])
    weights, run_meta = _resolve_weights(spec)
    model, extra = model_from_bytes(storage.read_bytes(weights), source=weights)
    desc = extra.get("schedule") or run_meta.get("schedule")
    if desc is not None:
        schedule = schedule_from_description(desc, weights)
    elif isinstance(getattr(model, "schedule", None), Schedule):
        schedule = model.schedule  # the mixture oracle carries its own
    else:
        raise CheckpointError(f"{weights}: no schedule recorded in the checkpoint metadata")
    config = getattr(model, "config", {})
    name = str(extra.get("name") or model_name(config, step=extra.get("step")))
    return LoadedModel(model.eval(), schedule, model_digest(model), name, weights)


PRECISIONS = ("auto", "fp32", "fp64", "bf16")


def eps_function(model: nn.Module, device: torch.device, precision: str = "auto") -> EpsFn:
    """ε(x, n) on ``device``. ``auto``: bf16 autocast on CUDA, fp32 on CPU.

    ``fp64`` runs the network in float64: slower, but its output for an image
    then does not depend on what else is in the batch (fp32 CPU kernels differ
    at ~1e-7 between batch sizes), which makes results exactly invariant to
    world size and batch size.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = torch.float64 if precision == "fp64" else torch.float32
    model.to(device=device, dtype=dtype) if precision == "fp64" else model.to(device)
    use_autocast = precision == "bf16"

    def eps(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=use_autocast):
            return model(x.to(device=device, dtype=dtype), n.to(device))

    return eps
