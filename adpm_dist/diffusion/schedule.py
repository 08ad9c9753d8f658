"""Noise schedules and timestep trajectories, in float64.

Conventions (docs/architecture.md): timesteps n = 1..N; arrays indexed by n have length
N+1. ``alphas_cumprod[0] = 1`` means clean data, ``betas[0] = 0`` is unused.
Everything stays float64: the cosine schedule's ᾱ_N ≈ 2e-9 is lost in float32.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

MIN_STEPS = 10
MAX_STEPS = 4000


@dataclass(frozen=True)
class Schedule:
    """A forward process q(x_n | x_0) = N(√ᾱ_n x_0, β̄_n I), n = 1..N."""

    name: str
    betas: np.ndarray  # length N+1, betas[0] = 0

    def __post_init__(self):
        b = np.asarray(self.betas, dtype=np.float64)
        if b.ndim != 1 or b.shape[0] < MIN_STEPS + 1 or b.shape[0] > MAX_STEPS + 1:
            raise ValueError(
                f"schedule '{self.name}': need {MIN_STEPS}..{MAX_STEPS} betas, got {b.shape[0] - 1}"
            )
        if b[0] != 0.0:
            raise ValueError(f"schedule '{self.name}': betas[0] must be 0 (index 0 is unused)")
        inner = b[1:]
        if not np.all(np.isfinite(inner)) or np.any(inner <= 0) or np.any(inner >= 1):
            raise ValueError(f"schedule '{self.name}': every beta must lie in (0, 1)")
        b.setflags(write=False)
        object.__setattr__(self, "betas", b)
        abar = np.cumprod(1.0 - b)
        abar.setflags(write=False)
        object.__setattr__(self, "_abar", abar)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0] - 1

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_n for n = 0..N (ᾱ_0 = 1)."""
        return self._abar  # type: ignore[attr-defined]

    @property
    def bar_betas(self) -> np.ndarray:
        """β̄_n = 1 − ᾱ_n for n = 0..N (β̄_0 = 0)."""
        return 1.0 - self._abar  # type: ignore[attr-defined]

    def betas_sha256(self) -> str:
        """sha256 of β_1..β_N as float64 little-endian: identifies the schedule in Γ files."""
        return hashlib.sha256(self.betas[1:].astype("<f8").tobytes()).hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "num_timesteps": self.num_timesteps,
            "betas_sha256": self.betas_sha256(),
        }


def linear_betas(num_timesteps: int, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """Ho et al. (2020): β linear from 1e-4 to 0.02 (returned as β_1..β_N)."""
    return np.linspace(start, end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021): ᾱ(t) ∝ cos²((t/N + s)/(1 + s)·π/2), β capped at 0.999."""
    n = np.arange(num_timesteps + 1, dtype=np.float64)
    f = np.cos((n / num_timesteps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    abar = f / f[0]
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def make_schedule(name: str, num_timesteps: int | None = None, betas=None) -> Schedule:
    """Build a schedule by name ('linear', 'cosine') or from explicit β_1..β_N ('custom')."""
    if betas is not None:
        inner = np.asarray(betas, dtype=np.float64).reshape(-1)
        if num_timesteps is not None and inner.shape[0] != num_timesteps:
            raise ValueError(f"got {inner.shape[0]} betas but num_timesteps={num_timesteps}")
        return Schedule(name if name else "custom", np.concatenate([[0.0], inner]))
    if num_timesteps is None:
        raise ValueError("num_timesteps is required unless betas are given")
    if not MIN_STEPS <= num_timesteps <= MAX_STEPS:
        raise ValueError(f"num_timesteps must be in [{MIN_STEPS}, {MAX_STEPS}], got {num_timesteps}")
    builders = {"linear": linear_betas, "cosine": cosine_betas}
    if name not in builders:
        raise ValueError(f"unknown schedule '{name}'; choose one of {sorted(builders)} or pass betas")
    return Schedule(name, np.concatenate([[0.0], builders[name](num_timesteps)]))


def schedule_from_description(desc: dict, source: str = "schedule") -> Schedule:
    """Rebuild the schedule a Γ file or checkpoint describes, and check its betas digest.

    ``desc`` has ``name`` and ``num_timesteps`` (named schedules) or ``betas``
    (any other), and optionally ``betas_sha256``, which must then match.
    """
    try:
        if "betas" in desc:
            sched = make_schedule(desc.get("name", "custom"), betas=desc["betas"])
        else:
            sched = make_schedule(desc["name"], int(desc["num_timesteps"]))
    except KeyError as exc:
        raise ValueError(f"{source}: schedule description lacks {exc.args[0]!r}") from None
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    want = desc.get("betas_sha256")
    if want is not None and want != sched.betas_sha256():
        raise ValueError(
            f"{source}: schedule {desc.get('name')!r} (N={desc.get('num_timesteps')}) has betas digest "
            f"{want[:12]}…, but rebuilding it gives {sched.betas_sha256()[:12]}… — a custom schedule "
            "must carry its 'betas'"
        )
    return sched
