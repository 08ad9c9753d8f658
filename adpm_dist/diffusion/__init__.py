"""Pure maths of Analytic-DPM: schedules, variances, samplers, likelihood.

No I/O and no torch.distributed in this package; everything is a function of
its arguments so it can be tested against closed-form oracles.
"""

from adpm_dist.diffusion.analytic import METHODS, StepVariances, step_variances
from adpm_dist.diffusion.schedule import Schedule, make_schedule
from adpm_dist.diffusion.trajectory import make_trajectory

__all__ = [
    "METHODS",
    "Schedule",
    "StepVariances",
    "make_schedule",
    "make_trajectory",
    "step_variances",
]
