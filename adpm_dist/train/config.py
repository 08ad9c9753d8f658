"""Training configuration: dataclasses, YAML presets and ``a.b=c`` overrides.

Precedence (docs/train.md): preset YAML < user YAML < command-line overrides.

* A preset is one of ``adpm_dist/configs/NAME.yaml`` (package data). A user YAML
  names its base with a top-level ``preset: NAME`` key (or is itself a preset file).
* Overrides are ``section.key=value``; the value is parsed as YAML, so
  ``optim.lr=2e-4``, ``data.hflip=true`` and ``data.urls=[a,b]`` all work.
* Every key is checked against the dataclasses: an unknown or mistyped key is
  an error that names the key, where it came from, and the valid choices.

The resolved config (after all merges) is saved with every run as
``config.yaml``; ``load_config`` reads it back unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from adpm_dist.diffusion.schedule import MAX_STEPS, MIN_STEPS
from adpm_dist.errors import UserError

# The presets ship inside the package (adpm_dist/configs/*.yaml, package data), so a wheel
# install finds them as well as a checkout does; the top-level configs/ is a link to them.
CONFIG_DIR = Path(str(resources.files("adpm_dist").joinpath("configs")))
PRESETS = ("tiny", "mnist", "cifar10", "celeba64", "imagenet64")
SCHEDULES = ("linear", "cosine")  # the named schedules of diffusion.schedule.make_schedule


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key and the source."""


@dataclass
class ModelConfig:
    """The ε-network: a registry preset plus constructor overrides (see models.registry)."""

    preset: str = "tiny"
    # Passed to build_model(preset, **options); the registry validates these names.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DiffusionConfig:
    """The forward process the network is trained for (diffusion.schedule.make_schedule)."""

    schedule: str = "linear"
    num_timesteps: int = 1000


@dataclass
class DataConfig:
    """The training stream (adpm_dist.data.TrainStream)."""

    urls: list[str] = field(default_factory=list)  # shard URLs or a manifest directory
    batch_size: int = 128  # GLOBAL batch; each rank gets batch_size // world_size
    batches_per_epoch: int = 0  # per rank; 0 = dataset size // batch_size (from the manifest)
    num_workers: int = 2
    resolution: int | None = None
    channels: int | None = None
    hflip: bool = False
    shuffle_buffer: int = 1000
    max_bad_fraction: float = 0.01  # skipped (broken) samples tolerated before BadDataError


@dataclass
class OptimConfig:
    """AdamW, linear warm-up, gradient clipping. Weight decay is always explicit."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 5000
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    """The loop: length, checkpoints, logging, engine settings."""

    run_dir: str = "runs/default"
    seed: int = 0
    total_steps: int = 1000
    ckpt_every: int = 1000
    keep_ckpts: int = 0  # keep only the newest K checkpoints in run_dir/ckpt; 0 keeps all
    log_every: int = 10
    loss: str = "mse"  # "mse" (L_simple) or "l1"
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay = min(ema_decay, (1 + k) / (10 + k)) at update k
    zero_stage: int = 0
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32" or "bf16"
    max_bad_steps: int = 3  # consecutive non-finite losses before stopping
    sample_every: int = 0  # 0 = no sample grids
    sample_count: int = 16
    sample_steps: int = 50
    stage_dir: str = ""  # local folder for DeepSpeed state when run_dir is remote; "" = temp
    progress: bool = True


@dataclass
class Config:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Value checks that types alone cannot express: ConfigError naming key and value."""
        for key, ok, why in _VALUE_CHECKS:
            value = self.get(key)
            if not ok(value):
                raise ConfigError(f"config key '{key}'={value!r} {why}")

    def get(self, key: str) -> Any:
        """The value at a dotted key, e.g. ``cfg.get("optim.lr")``."""
        section, name = key.split(".")
        return getattr(getattr(self, section), name)


def _number(low: float | None = None, high: float | None = None, *, above: bool = False,
            below: bool = False) -> Any:
    """A check for a finite number in [low, high] (``above``/``below``: open at that end)."""
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return ((low is None or (v > low if above else v >= low))
                and (high is None or (v < high if below else v <= high)))
    return ok


def _optional(check: Any) -> Any:
    return lambda v: v is None or check(v)


# (key, check, why). NaN and ±inf fail every number check.
_VALUE_CHECKS: list[tuple[str, Any, str]] = [
    ("model.preset", lambda v: bool(v), "must name a model preset"),
    ("diffusion.schedule", lambda v: v in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
    ("diffusion.num_timesteps", _number(MIN_STEPS, MAX_STEPS),
     f"must be in [{MIN_STEPS}, {MAX_STEPS}]"),
    ("data.batch_size", _number(1), "must be >= 1 (the global batch)"),
    ("data.batches_per_epoch", _number(0), "must be >= 0 (0 = from the manifests)"),
    ("data.num_workers", _number(0), "must be >= 0 (0 = read in the training process)"),
    ("data.resolution", _optional(_number(1)), "must be >= 1, or null (= the model's)"),
    ("data.channels", lambda v: v in (None, 1, 3), "must be 1, 3 or null (= the model's)"),
    ("data.shuffle_buffer", _number(1), "must be >= 1"),
    ("data.max_bad_fraction", _number(0.0, 1.0, below=True), "must be in [0, 1)"),
    ("optim.lr", _number(0.0, above=True), "must be a finite number > 0"),
    ("optim.weight_decay", _number(0.0), "must be a finite number >= 0"),
    ("optim.betas", lambda v: len(v) == 2 and all(_number(0.0, 1.0, below=True)(b) for b in v),
     "must be two numbers in [0, 1)"),
    ("optim.eps", _number(0.0, above=True), "must be a finite number > 0"),
    ("optim.warmup_steps", _number(0), "must be >= 0"),
    ("optim.grad_clip", _number(0.0), "must be a finite number >= 0 (0 = no clipping)"),
    ("train.run_dir", lambda v: bool(v.strip()), "must name a folder or s3:// URL"),
    ("train.seed", _number(0), "must be >= 0"),
    ("train.total_steps", _number(0), "must be >= 0"),
    ("train.ckpt_every", _number(1), "must be >= 1"),
    ("train.keep_ckpts", _number(0), "must be >= 0 (0 = keep all)"),
    ("train.log_every", _number(1), "must be >= 1"),
    ("train.loss", lambda v: v in ("mse", "l1"), "must be 'mse' or 'l1'"),
    ("train.ema_decay", _number(0.0, 1.0, below=True), "must be in [0, 1)"),
    ("train.zero_stage", lambda v: v in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
    ("train.precision", lambda v: v in ("auto", "fp32", "bf16"), "must be 'auto', 'fp32' or 'bf16'"),
    ("train.max_bad_steps", _number(1), "must be >= 1"),
    ("train.sample_every", _number(0), "must be >= 0 (0 = no sample grids)"),
    ("train.sample_count", _number(1), "must be >= 1"),
    ("train.sample_steps", _number(1), "must be >= 1"),
]


# ---------------------------------------------------------------- type checking


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints become floats where floats are due."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: '{key}' cannot be {value!r}")
    bad = ConfigError(
        f"{source}: config key '{key}' expects {_describe(tp)}, got {value!r} "
        f"({type(value).__name__})"
    )
    if origin is list:
        if not isinstance(value, (list, tuple)):
            if args and args[0] is str and isinstance(value, str):
                return [value]  # a single URL is a list of one
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp in (bool, str):  # taken as they are: no YAML coercion between these and numbers
        if not isinstance(value, tp):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string: accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, choices: list[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(
        f"{source}: unknown config key '{key}'{hint}; valid choices: {', '.join(sorted(choices))}"
    )


def _merge_into(obj: Any, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Set fields of dataclass ``obj`` from nested ``data``, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(full, names, source)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value, source, f"{full}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            # Free-form maps (model.options) merge key by key so overrides stack.
            current.update(value)
        else:
            setattr(obj, key, _coerce(value, hints[key], full, source))


# ---------------------------------------------------------------- loading


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise _unknown_key(f"preset={name}", list(PRESETS), "preset")
    return CONFIG_DIR / f"{name}.yaml"


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' → ('a.b', yaml-parsed c)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _layer(cfg: Config, data: dict[str, Any], source: str, seen: tuple[str, ...] = ()) -> None:
    """Apply one YAML mapping, first applying the preset it names (if any)."""
    data = dict(data)
    base = data.pop("preset", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{source}: 'preset' must be a name, got {base!r}")
        path = preset_path(base)
        if str(path) in seen:
            raise ConfigError(f"{source}: preset cycle through {path}")
        _layer(cfg, _read_yaml(path), str(path), seen + (str(path),))
    _merge_into(cfg, data, source)


def build_config(
    config_path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> Config:
    """Defaults < preset YAML < user YAML < overrides, validated."""
    cfg = Config()
    if preset is not None:
        _layer(cfg, {"preset": preset}, "--preset")
    if config_path is not None:
        _layer(cfg, _read_yaml(config_path), str(config_path))
    for text in overrides or []:
        key, value = parse_override(text)
        if key == "preset":
            raise ConfigError("override 'preset=...' is not allowed; use --preset or the YAML")
        _merge_into(cfg, _nest(key, value), f"override '{text}'")
    cfg.validate()
    return cfg


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_from_yaml(text: str, source: str = "<config.yaml>") -> Config:
    """Rebuild a Config from a saved resolved config (the same checks apply)."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    cfg = Config()
    _layer(cfg, data, source)
    cfg.validate()
    return cfg
