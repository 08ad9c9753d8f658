"""Model presets and the one function that turns a name or a config into a network.

A model config is a JSON-serialisable dict with a ``"type"`` key naming a
registered constructor and the constructor's keyword arguments as the other
keys. Every model built here carries its own config as ``model.config``, so
``build_model(model.config)`` rebuilds the same architecture; checkpoints
(``adpm_dist.models.io``) store exactly that dict next to the weights.

Presets (ε output; counts checked in tests/test_models.py):

==========  =========  ==========================================================
preset      params     architecture
==========  =========  ==========================================================
tiny          176,849  8×8×1, ch 16, mult (1,2), 1 block, attn 4 — tests, sklearn digits
mnist       1,623,169  28×28×1 (28→14→7), ch 32, mult (1,2,2), 2 blocks, attn 7 — sized to
                       train on a CPU in minutes (make demo)
cifar10    35,746,307  Ho et al. 2020: 32×32×3, ch 128, mult (1,2,2,2), 2 blocks, attn 16
celeba64   78,700,803  DDIM/Analytic-DPM: 64×64×3, ch 128, mult (1,2,2,2,4), attn 16
imagenet64 121,060,483 Improved DDPM: 64×64×3, ch 128, mult (1,2,3,4), 3 blocks,
                       attn 16 and 8, 4 heads, scale-shift norm, dropout 0
==========  =========  ==========================================================

Names (:func:`model_name`; what Γ files, sample metadata and errors show): the dimensions
``unet-ch32-res28-c1`` (base width, resolution, channels), prefixed by the preset the config
is (``mnist:unet-ch32-res28-c1``) or by the nearest preset and what differs from it
(``tiny+ch=8:unet-ch8-res8-c1``); a trained checkpoint adds its step (``…@step240``).
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable
from typing import Any

from torch import nn

from adpm_dist.models.unet import MODEL_TYPE as UNET_TYPE
from adpm_dist.models.unet import UNet

# Constructor for each model type; other modules add theirs with register_model_type.
MODEL_TYPES: dict[str, Callable[..., nn.Module]] = {UNET_TYPE: UNet}

# Parameter counts (ε output) are asserted in tests/test_models.py.
PRESETS: dict[str, dict[str, Any]] = {
    # 176,849 parameters. 8×8 single-channel data (scikit-learn digits): fast tests.
    "tiny": {
        "type": UNET_TYPE, "in_channels": 1, "out_channels": 1, "resolution": 8,
        "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
        "dropout": 0.0, "pad_to": None, "num_heads": 1, "scale_shift_norm": False,
    },
    # 1,623,169 parameters. MNIST 28×28 at its own size (28 → 14 → 7, attention at 7×7):
    # ~3× cheaper per image than a 64-channel net padded to 32×32, which is what
    # lets `make demo` train, estimate Γ and evaluate on 2 CPU cores in minutes.
    "mnist": {
        "type": UNET_TYPE, "in_channels": 1, "out_channels": 1, "resolution": 28,
        "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 2, "attn_resolutions": [7],
        "dropout": 0.1, "pad_to": None, "num_heads": 1, "scale_shift_norm": False,
    },
    # 35,746,307 parameters: the CIFAR-10 model of Ho et al. (2020), "35.7M".
    "cifar10": {
        "type": UNET_TYPE, "in_channels": 3, "out_channels": 3, "resolution": 32,
        "ch": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16],
        "dropout": 0.1, "pad_to": None, "num_heads": 1, "scale_shift_norm": False,
    },
    # 78,700,803 parameters: the CelebA 64×64 model of DDIM / Analytic-DPM.
    "celeba64": {
        "type": UNET_TYPE, "in_channels": 3, "out_channels": 3, "resolution": 64,
        "ch": 128, "ch_mult": [1, 2, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
        "dropout": 0.1, "pad_to": None, "num_heads": 1, "scale_shift_norm": False,
    },
    # 121,060,483 parameters: Improved-DDPM ImageNet 64×64 widths (4 heads,
    # scale-shift GroupNorm), ε output only (no learned variance channels).
    "imagenet64": {
        "type": UNET_TYPE, "in_channels": 3, "out_channels": 3, "resolution": 64,
        "ch": 128, "ch_mult": [1, 2, 3, 4], "num_res_blocks": 3, "attn_resolutions": [16, 8],
        "dropout": 0.0, "pad_to": None, "num_heads": 4, "scale_shift_norm": True,
    },
}


MAX_NAMED_CHANGES = 3  # beyond this many keys from the nearest preset, a name shows dims only


def _value(v: Any) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if k != "type" and old.get(k) != new.get(k))


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What sets two model configs apart: ``"ch 16 → 8, dropout 0.0 → 0.1"`` ("" if equal)."""
    return ", ".join(f"{k} {_value(old.get(k))} → {_value(new.get(k))}"
                     for k in _changed_keys(old, new))


def model_name(config: dict[str, Any], step: int | None = None) -> str:
    """A name a person can tell models apart by (see the module docstring)."""
    kind = str(config.get("type", "model"))
    name = kind
    if kind == UNET_TYPE:
        name = f"unet-ch{config.get('ch')}-res{config.get('resolution')}-c{config.get('in_channels')}"
    near = [(len(_changed_keys(p, config)), preset) for preset, p in PRESETS.items()
            if p.get("type") == kind]
    if near:
        count, preset = min(near, key=lambda t: t[0])  # ties: the first preset listed
        changes = _changed_keys(PRESETS[preset], config)
        if count <= MAX_NAMED_CHANGES:
            name = "+".join([preset, *(f"{k}={_value(config.get(k))}" for k in changes)]) + f":{name}"
    return name if step is None else f"{name}@step{int(step)}"


def register_model_type(name: str, ctor: Callable[..., nn.Module]) -> None:
    """Make ``ctor`` buildable as ``{"type": name, ...}``.

    Registering the same constructor twice is a no-op (module reloads);
    claiming an existing name for a different constructor is an error, since
    it would silently change what stored checkpoints rebuild into.
    """
    existing = MODEL_TYPES.get(name)
    if existing is not None and existing is not ctor:
        raise ValueError(f"model type {name!r} is already registered to {existing!r}")
    MODEL_TYPES[name] = ctor


def resolve_config(spec: str | dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The full config dict for a preset name or a config dict, with overrides applied."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(
                f"unknown model preset {spec!r}; valid presets: {', '.join(sorted(PRESETS))}")
        config = copy.deepcopy(PRESETS[spec])
    elif isinstance(spec, dict):
        config = copy.deepcopy(spec)
    else:
        raise ValueError(f"model spec must be a preset name or a config dict, got {type(spec)}")
    config.update(overrides)
    return config


def _check_kwargs(model_type: str, ctor: Callable[..., nn.Module], kwargs: dict) -> None:
    """ValueError naming unknown keys, instead of the constructor's bare TypeError."""
    params = inspect.signature(ctor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [name for name, p in params.items()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              inspect.Parameter.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"model type {model_type!r} does not accept {unknown}; "
                         f"valid keys: {', '.join(accepted)}")


def build_model(spec: str | dict[str, Any], **overrides: Any) -> nn.Module:
    """Build a model from a preset name (``"cifar10"``) or a config dict with ``"type"``.

    ``overrides`` replace config entries, e.g. ``build_model("cifar10", dropout=0.0)``.
    Unknown presets, types or keys raise ValueError listing the valid choices.
    """
    config = resolve_config(spec, **overrides)
    model_type = config.pop("type", None)
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {model_type!r}; "
                         f"valid types: {', '.join(sorted(MODEL_TYPES))}")
    ctor = MODEL_TYPES[model_type]
    _check_kwargs(model_type, ctor, config)
    model = ctor(**config)
    if not isinstance(getattr(model, "config", None), dict):
        raise ValueError(f"model type {model_type!r} built a model without a config dict")
    return model
