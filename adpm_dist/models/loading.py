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
FID_PRECISIONS = ("auto", "fp32", "tf32", "bf16")  # the Inception network has no float64 path here
FULL_PRECISION = {"fp32", "fp64"}
PRECISION_POLICY = ("auto = fp32 with TF32 off, for every stage on every device; tf32, bf16 (autocast) and "
                    "fp64 only when asked for")


def resolve_precision(precision: str, device: torch.device | str, statistics: bool = False) -> str:
    """The numeric mode ``precision`` means: fp32, tf32, bf16 or fp64 (the one policy of every stage).

    ``auto`` is fp32 with TF32 off everywhere — the Γ job, the NLL, FID and sampling, on CPU and
    on CUDA. Near t = N, 1 − Γ_t is ~1e-5 while bf16 and TF32 perturb ε by ~1e-3
    (tools/bench_modes.py measures it), and the variances of sampling are computed from a Γ
    estimated in fp32, so sampling too stays in fp32 unless a faster mode is asked for
    (``--precision bf16``; until 2026-12 ``auto`` meant bf16 for sampling on CUDA). ``device``
    and ``statistics`` are kept for the callers; they no longer change the answer.
    """
    del device, statistics
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    return "fp32" if precision == "auto" else precision


def numeric_mode(mode: str, device: torch.device | str) -> dict:
    """What a stage records about the arithmetic it ran in (``numeric_mode`` in every output):
    the resolved mode, the network's dtype (bf16: float32 weights under bf16 autocast), whether
    the TF32 switches were on (they act on CUDA only) and the device type."""
    dtype = {"fp64": "float64", "bf16": "bfloat16"}.get(mode, "float32")
    return {"precision": mode, "dtype": dtype, "autocast": mode == "bf16", "tf32": mode == "tf32",
            "device": torch.device(device).type}


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
