"""Training configuration on OmegaConf: the dataclasses below are the schema
(``OmegaConf.structured(Config)``); presets, a user YAML and ``a.b=c`` overrides are merged into it.

Precedence (docs/train.md): built-in defaults < preset YAML < user YAML < command-line overrides.
A user YAML names its base with a top-level ``preset: NAME`` key (presets may chain). Overrides
are an OmegaConf dotlist, the value read as YAML (``data.urls=[a,b]``; ``key=`` is ''), and
``${section.key}`` / ``${oc.env:VAR}`` interpolations are resolved after the last layer.
OmegaConf refuses an unknown key or a mistyped value as the layer is merged; we report it as
ONE :class:`ConfigError` line naming the key and its source (file or override), for an unknown
key with the nearest valid one. Ranges and choices are checked last (:meth:`Config.validate`).
The resolved config is saved with every run as ``config.yaml`` (``config_from_yaml`` reads it).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

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
    compile: bool = False  # torch.compile the ε-network (DeepSpeed engine.compile); for GPUs
    max_bad_steps: int = 3  # consecutive non-finite losses before stopping
    sample_every: int = 0  # 0 = no sample grids
    sample_count: int = 16
    sample_steps: int = 50
    stage_dir: str = ""  # local folder for DeepSpeed state when run_dir is remote; "" = temp
    progress: bool = True
    collective_timeout: float = 0.0  # s without progress before a stuck rank ends the job; 0 = auto


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
    ("train.collective_timeout", _number(0.0), "must be >= 0 seconds (0 = auto)"),
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


# ---------------------------------------------------------------- errors in our words


def _unknown_key(key: str, choices: list[str], source: str, what: str = "config key") -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown {what} '{key}'{hint}; valid choices: {', '.join(sorted(choices))}")


def _our_error(exc: OmegaConfBaseException, source: str, schema: DictConfig) -> ConfigError:
    """OmegaConf's error as ONE line naming the key and the source (its own text spans lines)."""
    key = str(exc.full_key or exc.key or "")
    if isinstance(exc, ConfigKeyError) and key:
        parent = OmegaConf.select(schema, key.rpartition(".")[0]) if "." in key else schema
        return _unknown_key(key, list(parent) if isinstance(parent, DictConfig) else [], source)
    what = (exc.msg or str(exc) or type(exc).__name__).splitlines()[0]
    return ConfigError(f"{source}: config key '{key or '<top>'}': {what}")


# ---------------------------------------------------------------- loading


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping through OmegaConf's loader (so 1e-4 is a float), as a plain dict."""
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping, got a list")
    return OmegaConf.to_container(loaded, resolve=False)


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise _unknown_key(name, list(PRESETS), "preset", what="preset")
    return CONFIG_DIR / f"{name}.yaml"


def parse_override(text: str) -> dict[str, Any]:
    """'a.b=c' → {'a': {'b': c}} through OmegaConf's dotlist (c read as YAML; 'a.b=' is '')."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    if key == "preset":
        raise ConfigError("override 'preset=...' is not allowed; use --preset or the YAML")
    if not raw.strip():
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}=''"]))
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={raw}"]))
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': the value is not valid YAML "
                          f"({' '.join(str(exc).split())[:120]}); quote it") from None


def _one_url_is_a_list(data: dict[str, Any]) -> dict[str, Any]:
    """``data.urls: a.tar`` means ``[a.tar]``: a single shard pattern is a list of one."""
    section = data.get("data")
    if isinstance(section, dict) and isinstance(section.get("urls"), str):
        data = {**data, "data": {**section, "urls": [section["urls"]]}}
    return data


class _Layers:
    """The schema and the layers merged into it so far (each checked as it is merged)."""

    def __init__(self) -> None:
        self.cfg = OmegaConf.structured(Config)

    def merge(self, data: dict[str, Any], source: str) -> None:
        try:
            self.cfg = OmegaConf.merge(self.cfg, _one_url_is_a_list(data))
        except OmegaConfBaseException as exc:
            raise _our_error(exc, source, self.cfg) from None

    def layer(self, data: dict[str, Any], source: str, seen: tuple[str, ...] = ()) -> None:
        """Apply one YAML mapping, first applying the preset it names (if any)."""
        data = dict(data)
        base = data.pop("preset", None)
        if base is not None:
            if not isinstance(base, str):
                raise ConfigError(f"{source}: 'preset' must be a name, got {base!r}")
            path = preset_path(base)
            if str(path) in seen:
                raise ConfigError(f"{source}: preset cycle through {path}")
            self.layer(_read_yaml(path), str(path), seen + (str(path),))
        self.merge(data, source)

    def resolved(self, source: str) -> Config:
        """The merged layers as the dataclasses, interpolations resolved, values checked."""
        try:
            cfg = OmegaConf.to_object(self.cfg)
        except OmegaConfBaseException as exc:
            raise _our_error(exc, source, self.cfg) from None
        cfg.validate()
        return cfg


def build_config(
    config_path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> Config:
    """Defaults < preset YAML < user YAML < overrides, validated."""
    layers = _Layers()
    if preset is not None:
        layers.layer({"preset": preset}, "--preset")
    if config_path is not None:
        layers.layer(_read_yaml(config_path), str(config_path))
    for text in overrides or []:
        layers.merge(parse_override(text), f"override '{text}'")
    return layers.resolved("the merged config")


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_from_yaml(text: str, source: str = "<config.yaml>") -> Config:
    """Rebuild a Config from a saved resolved config (the same checks apply)."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    layers = _Layers()
    layers.layer(data, source)
    return layers.resolved(source)
