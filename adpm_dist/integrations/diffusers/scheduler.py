"""Analytic-DPM as a diffusers scheduler: ``AnalyticDPMScheduler`` (optional extra).

Drop-in for ``DDPMPipeline``/``DDIMPipeline``: ``pipe.scheduler = AnalyticDPMScheduler(...)``
(assign after construction: ``DDIMPipeline.__init__`` converts whatever it is given
into a ``DDIMScheduler``). The variances and means come from
:mod:`adpm_dist.diffusion.analytic` and :mod:`adpm_dist.diffusion.samplers`.

Timesteps are exposed 0-based and descending like diffusers' (t = τ_k − 1);
Γ is kept in the config like ``trained_betas`` (a list of N floats, Γ_1..Γ_N), and so are
its standard errors (``gamma_stderr``, the weights of the ``weighted`` covariance fit;
``from_gamma_file`` copies them from the Γ file).

Per-image noise: pass the pipeline a *list* of generators (one per image) and
the scheduler draws image i's step noise from generator i alone, exactly as
:func:`adpm_dist.diffusion.samplers.run_reverse` does; the pipeline draws the
initial noise the same way (``randn_tensor`` with a list), so the images equal
our sampler's bit for bit. With one generator (or none) noise is drawn for the
batch at once, as diffusers' own schedulers do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from adpm_dist.diffusion.analytic import (
    DDPM_FAMILY,
    METHODS,
    RESIDUAL_METHODS,
    is_ddpm_family,
    step_variances,
)
from adpm_dist.diffusion.residual import DIRECTIONS, ErrorMoments
from adpm_dist.diffusion.samplers import per_image_normal, predict_x0, reverse_mean
from adpm_dist.diffusion.trajectory import TRAJECTORIES, make_trajectory
from adpm_dist.models.diffusers_adapter import schedule_from_diffusers


def _moments_from_config(moments: dict | None, n: int) -> ErrorMoments | None:
    """A_t, B_t, C_t (lists of N floats, t = 1..N, like ``gamma``) as ErrorMoments, or None."""
    if moments is None:
        return None
    arrays = {}
    for key in ("a", "b", "c"):
        values = np.asarray(moments.get(key, []), dtype=np.float64)
        if values.shape != (n,):
            raise ValueError(f"model_error_moments['{key}'] needs N={n} values, got {values.shape}")
        arrays[key] = np.concatenate([[np.nan], values])
    return ErrorMoments(arrays["a"], arrays["b"], arrays["c"])


@dataclass
class AnalyticDPMSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class AnalyticDPMScheduler(SchedulerMixin, ConfigMixin):
    """Reverse steps of any of our methods (analytic-ddpm/-ddim, residual-ddpm/-ddim, ddpm-beta/-tilde,
    ddim). The residual methods need the model-error moments (``from_gamma_file`` copies them from
    a Γ file of format 2 into ``model_error_moments``)."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        gamma: list[float] | None = None,
        method: str = "analytic-ddpm",
        eta: float = 0.0,
        trajectory: str = "even",
        clip_sample: bool = True,
        clip_pixel: float | None = None,
        prediction_type: str = "epsilon",
        ddim_direction: str = "network",
        model_error_moments: dict | None = None,
        covariance_fit: str = "weighted",
        gamma_stderr: list[float] | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}'; choose one of {list(METHODS)}")
        if trajectory not in TRAJECTORIES:
            raise ValueError(f"unknown trajectory '{trajectory}'; choose one of {list(TRAJECTORIES)}")
        if ddim_direction not in DIRECTIONS:
            raise ValueError(f"unknown ddim_direction '{ddim_direction}'; choose one of {list(DIRECTIONS)}")
        if prediction_type != "epsilon":
            raise ValueError(f"prediction_type '{prediction_type}' is not supported by "
                             "AnalyticDPMScheduler; only 'epsilon'")
        self.schedule = schedule_from_diffusers(
            {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
             "beta_schedule": beta_schedule, "trained_betas": trained_betas}, "AnalyticDPMScheduler")
        self.gamma_vector = None if gamma is None else np.asarray(gamma, dtype=np.float64)
        if self.gamma_vector is not None and self.gamma_vector.shape != (num_train_timesteps,):
            raise ValueError(f"gamma has {self.gamma_vector.shape[0]} entries; need N={num_train_timesteps}")
        self.gamma_stderr = None if gamma_stderr is None else np.asarray(gamma_stderr, dtype=np.float64)
        if self.gamma_stderr is not None and self.gamma_stderr.shape != (num_train_timesteps,):
            raise ValueError(f"gamma_stderr has {self.gamma_stderr.shape[0]} entries; "
                             f"need N={num_train_timesteps}")
        self.moments = _moments_from_config(model_error_moments, num_train_timesteps)
        if method in RESIDUAL_METHODS and self.moments is None:
            raise ValueError(f"method '{method}' needs model_error_moments (build the scheduler with "
                             "from_gamma_file and a Γ file of format 2)")
        self.alphas_cumprod = torch.tensor(self.schedule.alphas_cumprod[1:], dtype=torch.float32)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self._steps: dict[int, tuple[int, float, float]] = {}

    @classmethod
    def from_gamma_file(cls, gamma_file, scheduler_config: dict, **kw) -> AnalyticDPMScheduler:
        """Build from a diffusers scheduler config and a Γ file.

        ``gamma_file``: a URL (read once and checked by :func:`adpm_dist.gamma.load_for`),
        a :class:`~adpm_dist.gamma.GammaRef` or a :class:`~adpm_dist.gamma.GammaFile`.
        """
        from adpm_dist.gamma import GammaRef, check_schedule, load_for

        if isinstance(gamma_file, str):
            gamma_file = load_for(None, gamma_file)
        if isinstance(gamma_file, GammaRef):
            gamma_file = gamma_file.file
        missing = gamma_file.missing_timesteps()
        if missing.size:
            # The scheduler may be asked for any K and trajectory later, and a diffusers
            # config cannot carry "unknown" entries: only a complete Γ file will do.
            raise ValueError(f"Γ file lacks {missing.size} timesteps (first: {missing[:5].tolist()}); "
                             "the diffusers scheduler needs all of them (run the Γ job with --timesteps all)")
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        base = {k: scheduler_config[k] for k in keys if k in scheduler_config}
        moments = gamma_file.error_moments(clip_x0=True)  # the scheduler clips x̂₀ (clip_sample)
        if moments is not None:
            kw.setdefault("model_error_moments", {k: [float(v) for v in getattr(moments, k)[1:]]
                                                  for k in ("a", "b", "c")})
        kw.setdefault("gamma_stderr", [float(v) for v in gamma_file.stderr])
        sched = cls(**base, gamma=[float(v) for v in gamma_file.gamma], **kw)
        check_schedule(gamma_file, sched.schedule, "Γ file")
        return sched

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """K steps on the configured trajectory; ``timesteps`` = τ_K−1, …, τ_1−1."""
        tau = make_trajectory(self.config.trajectory, self.schedule, num_inference_steps,
                              gamma=self.gamma_vector, fit=self.config.covariance_fit,
                              gamma_stderr=self.gamma_stderr)
        self._build(tau, self.config.eta)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(np.ascontiguousarray(tau[::-1] - 1)).to(device)

    def _build(self, tau: np.ndarray, eta: float) -> None:
        sv = step_variances(self.schedule, tau, self.config.method, gamma=self.gamma_vector, eta=eta,
                            clip_pixel=self.config.clip_pixel, fit=self.config.covariance_fit,
                            moments=self.moments, direction=self.config.ddim_direction,
                            gamma_stderr=self.gamma_stderr)
        self._tau, self._eta = tau, eta
        self._steps = {int(t): (int(s), float(l2), float(v))
                       for s, t, l2, v in zip(sv.s, sv.t, sv.lambda2, sv.sigma2)}

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float | None = None,
             use_clipped_model_output: bool | None = None, generator=None, variance_noise=None,
             return_dict: bool = True):
        """One reverse step from diffusers timestep ``timestep`` (our t = timestep + 1).

        ``eta`` (DDIMPipeline passes it): for the DDIM family it replaces the
        configured η; the DDPM family ignores it. ``use_clipped_model_output`` (DDIM
        family) as in diffusers' DDIMScheduler: True re-derives ε̂ from the clipped x̂₀
        (``ddim_direction='x0'``), False uses the network's output (``'network'``, the
        official Analytic-DPM code and DDIMScheduler's behaviour); None (what DDIMPipeline
        passes unless told) follows the configured ``ddim_direction``.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(K) before step()")
        if eta is not None and self.config.method not in DDPM_FAMILY and float(eta) != self._eta:
            self._build(self._tau, float(eta))
        t = int(timestep) + 1
        x0 = predict_x0(self.schedule, sample, model_output.to(sample.dtype), t)
        if self.config.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        if t == int(self._tau[0]):  # τ_1 → 0: the mean of p(x₀|x_{τ_1}) is x̂₀
            prev = x0
        else:
            if t not in self._steps:
                raise ValueError(f"timestep {timestep} is not on the trajectory set by set_timesteps")
            s, lam2, sig2 = self._steps[t]
            direction = self.config.ddim_direction if use_clipped_model_output is None else (
                "x0" if use_clipped_model_output else "network")
            raw = direction == "network" and not is_ddpm_family(self.config.method)
            eps = model_output.to(sample.dtype) if raw else None  # None: re-derived from x̂₀
            prev = reverse_mean(self.schedule, sample, x0, s, t, lam2, eps)
            if sig2 > 0:
                if variance_noise is None:
                    if isinstance(generator, list):
                        variance_noise = per_image_normal(generator, sample.shape[1:], sample.dtype,
                                                          sample.device)
                    else:
                        variance_noise = randn_tensor(sample.shape, generator=generator,
                                                      device=sample.device, dtype=sample.dtype)
                prev = prev + math.sqrt(sig2) * variance_noise
        if not return_dict:
            return (prev, x0)
        return AnalyticDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ x₀ + √β̄ ε at 0-based diffusers timesteps (computed in float64)."""
        abar = torch.tensor(np.array(self.schedule.alphas_cumprod[1:]), dtype=torch.float64)
        a = abar[timesteps.to("cpu").long()].to(original_samples.device)
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        sa, sb = a.sqrt().reshape(shape), (1 - a).sqrt().reshape(shape)
        return (sa * original_samples.double() + sb * noise.double()).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
