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

import contextlib
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


PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp64")
FULL_PRECISION = {"fp32", "fp64"}


def resolve_precision(precision: str, device: torch.device | str, statistics: bool = False) -> str:
    """The numeric mode ``precision`` means on ``device``: fp32, tf32, bf16 or fp64.

    ``auto`` is fp32 (TF32 off) for statistics (the Γ job, the NLL): near t = N, 1 − Γ_t is
    ~1e-5 while bf16 and TF32 perturb ε by ~1e-3. For sampling it is bf16 on CUDA, fp32 elsewhere.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cuda" and not statistics else "fp32"


def recorded_mode(precision: str | None) -> str | None:
    """The mode a file records; ``auto`` in files written before modes were resolved meant fp32
    (those versions only ever ran on CPU)."""
    return "fp32" if precision == "auto" else precision


def mode_warning(recorded: str | None, wanted: str, source: str) -> str | None:
    """The ``warning:`` line for a Γ file estimated in another numeric mode (None if it matches).

    fp32 and fp64 count as one mode here: both are exact to far below Γ's standard error, and
    tests and careful users pair an fp64 Γ with fp32 runs on purpose.
    """
    got = recorded_mode(recorded)
    if got is None or got == wanted or {got, wanted} <= FULL_PRECISION:
        return None
    return (f"warning: {source} was estimated with --precision {got}, this run uses {wanted}; "
            "accepted, but Γ near t = N depends on the numeric mode (docs/estimate.md)")


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matmuls/convolutions on or off while the block runs, restored after (they are global)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def eps_function(model: nn.Module, device: torch.device, precision: str = "auto",
                 statistics: bool = False) -> EpsFn:
    """ε(x, n) on ``device`` in the mode :func:`resolve_precision` gives.

    fp32 runs with TF32 off (PyTorch lets cuDNN use TF32 by default), tf32 with it on, bf16 under
    autocast. ``fp64`` runs the network in float64: slower, but its output for an image
    then does not depend on what else is in the batch (fp32 CPU kernels differ
    at ~1e-7 between batch sizes), which makes results exactly invariant to
    world size and batch size.
    """
    device = torch.device(device)
    mode = resolve_precision(precision, device, statistics)
    dtype = torch.float64 if mode == "fp64" else torch.float32
    model.to(device=device, dtype=dtype) if mode == "fp64" else model.to(device)
    use_autocast = mode == "bf16"

    def eps(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        with tf32(mode == "tf32"), torch.inference_mode(), \
                torch.autocast(device.type, torch.bfloat16, enabled=use_autocast):
            return model(x.to(device=device, dtype=dtype), n.to(device))

    eps.precision = mode  # type: ignore[attr-defined]
    return eps
