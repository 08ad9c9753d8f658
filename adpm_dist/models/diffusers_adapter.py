"""Load a diffusers ``UNet2DModel`` folder as one of our ε-networks (optional extra).

This module and :mod:`adpm_dist.integrations.diffusers.scheduler` are the only places that import diffusers.

Timesteps: we number them n = 1..N, diffusers 0..N−1 (its t = n−1 has our
ᾱ_n). :class:`DiffusersEps` is the ONE place that mapping happens.

``prediction_type``: ``epsilon`` is used as is; ``v_prediction`` and ``sample``
are converted exactly to ε (our choice, documented
here and tested): v: ε = √ᾱ_n v + √β̄_n x_n;  sample: ε = (x_n − √ᾱ_n x̂₀)/√β̄_n.
Anything else is refused with a message naming the folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from adpm_dist.diffusion.schedule import Schedule, cosine_betas, make_schedule
from adpm_dist.errors import UserError
from adpm_dist.io import storage

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DiffusersError(UserError, ValueError):
    """A diffusers folder cannot be used; the message names the file."""


def diffusers_betas(config: dict[str, Any], source: str = "scheduler config") -> tuple[str, np.ndarray]:
    """(schedule name, β_1..β_N float64) from a diffusers scheduler config, as diffusers builds them.

    linear: linspace(start, end, N); scaled_linear: linspace(√start, √end, N)²;
    squaredcos_cap_v2: Nichol & Dhariwal's cosine with β ≤ 0.999; trained_betas as given.
    """
    n = config.get("num_train_timesteps")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64).reshape(-1)
        if n is not None and betas.shape[0] != int(n):
            raise DiffusersError(f"{source}: {betas.shape[0]} trained_betas but num_train_timesteps={n}")
        return "diffusers:trained_betas", betas
    if n is None:
        raise DiffusersError(f"{source}: no 'num_train_timesteps' and no 'trained_betas'")
    n = int(n)
    kind = config.get("beta_schedule", "linear")
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    if kind == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = cosine_betas(n, s=0.008, max_beta=0.999)  # the one cosine schedule
    else:
        raise DiffusersError(f"{source}: beta_schedule '{kind}' is not supported "
                             "(linear, scaled_linear, squaredcos_cap_v2 or trained_betas)")
    name = f"diffusers:{kind}" if kind != "linear" else f"diffusers:linear({start:g},{end:g})"
    return name, betas


def schedule_from_diffusers(config: dict[str, Any], source: str = "scheduler config") -> Schedule:
    name, betas = diffusers_betas(config, source)
    try:
        return make_schedule(name, betas=betas)
    except ValueError as exc:
        raise DiffusersError(f"{source}: {exc}") from None


class DiffusersEps(nn.Module):
    """forward(x, n) with our n = 1..N → the UNet's ε prediction at diffusers t = n − 1."""

    def __init__(self, unet: nn.Module, schedule: Schedule, prediction_type: str, config: dict):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise DiffusersError(f"prediction_type '{prediction_type}' is not supported; "
                                 f"choose one of {list(PREDICTION_TYPES)}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.schedule = schedule
        self.config = config  # hashed by model_digest
        self.shape = (config["in_channels"], config["resolution"], config["resolution"])
        self.register_buffer("abar", torch.tensor(schedule.alphas_cumprod, dtype=torch.float64),
                             persistent=False)

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        out = self.unet(x, n - 1).sample  # the only 0-based mapping in the project
        if self.prediction_type == "epsilon":
            return out
        shape = (-1,) + (1,) * (x.dim() - 1)
        abar = self.abar.to(x.device)[n].reshape(shape)
        a, b = abar.sqrt().to(out.dtype), (1.0 - abar).sqrt().to(out.dtype)
        if self.prediction_type == "v_prediction":
            return a * out + b * x
        return (x - a * out) / b


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DiffusersError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise DiffusersError(f"{path}: not valid JSON ({exc})") from None


def _find(path: str) -> tuple[str, str]:
    """(unet folder, scheduler config file) for the usual layouts."""
    if os.path.isdir(os.path.join(path, "unet")):
        unet_dir = os.path.join(path, "unet")
    elif os.path.isfile(os.path.join(path, "config.json")):
        unet_dir = path
    else:
        raise DiffusersError(f"{path}: no unet/ subfolder and no config.json (not a diffusers folder)")
    for cand in (os.path.join(path, "scheduler", "scheduler_config.json"),
                 os.path.join(path, "scheduler_config.json")):
        if os.path.isfile(cand):
            return unet_dir, cand
    raise DiffusersError(f"{path}: no scheduler/scheduler_config.json or scheduler_config.json")


# What a diffusers folder needs of an object store: the UNet, the scheduler config and
# root-level files (a bare UNet folder); a pipeline's VAE or text encoder stay put.
_NEEDED = ("unet/", "scheduler/")


def fetch_folder(url: str, local_dir: str) -> None:
    """Copy the files of the diffusers folder at ``url`` (s3://) into ``local_dir``."""
    base = url.rstrip("/")
    files = storage.walk_files(base)
    if not files:
        raise DiffusersError(f"{url}: not found or empty (not a diffusers folder)")
    for src in files:
        rel = src[len(base):].lstrip("/")
        if "/" not in rel or rel.startswith(_NEEDED):
            storage.copy_file(src, os.path.join(local_dir, *rel.split("/")))


def load_diffusers(path: str):
    """A ``LoadedModel`` for the diffusers folder ``path`` (CPU, eval mode).

    ``path`` is a local folder, ``file://`` or ``s3://`` URL; a remote folder is
    downloaded (through :mod:`adpm_dist.io.storage`) into a temporary folder,
    loaded, and the copy deleted. Errors name ``path``, not the copy.
    """
    if not storage.is_remote(path):
        local = storage.local_path(path)
        return _load_folder(local, local)
    with tempfile.TemporaryDirectory(prefix="adpm_diffusers_") as tmp:
        fetch_folder(path, tmp)
        try:
            return _load_folder(tmp, path)
        except DiffusersError as exc:
            raise DiffusersError(str(exc).replace(tmp, path.rstrip("/"))) from None


def _load_folder(path: str, source: str):
    """Load the local diffusers folder ``path``; ``source`` is what the user named."""
    from diffusers import UNet2DModel

    from adpm_dist.models.io import model_digest
    from adpm_dist.models.loaded import LoadedModel

    unet_dir, sched_file = _find(path)
    sched_cfg = _read_json(sched_file)
    unet_cfg = _read_json(os.path.join(unet_dir, "config.json"))
    schedule = schedule_from_diffusers(sched_cfg, sched_file)
    prediction_type = sched_cfg.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise DiffusersError(f"{sched_file}: prediction_type '{prediction_type}' is not supported; "
                             f"choose one of {list(PREDICTION_TYPES)}")
    unet = UNet2DModel.from_pretrained(unet_dir).eval()
    size = unet_cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise DiffusersError(f"{unet_dir}/config.json: only square sample_size is supported, got {size}")
        size = size[0]
    if not isinstance(size, int):
        raise DiffusersError(f"{unet_dir}/config.json: needs an integer 'sample_size' (the image size)")
    config = {
        "type": "diffusers-unet2d",
        "in_channels": int(unet_cfg.get("in_channels", 3)),
        "resolution": size,
        "unet": {k: v for k, v in unet_cfg.items() if not k.startswith("_")},
        "prediction_type": prediction_type,
        "schedule": schedule.describe(),
    }
    model = DiffusersEps(unet, schedule, prediction_type, config).eval()
    name = f"diffusers:{storage.basename(source)}"
    return LoadedModel(model, schedule, model_digest(model), name, source)
