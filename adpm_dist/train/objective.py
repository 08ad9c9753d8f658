"""The training objective (L_simple, Ho et al. 2020 Eq. 14) and the randomness it draws.

n ~ U{1..N}, ε ~ N(0, I), x_n = √ᾱ_n x_0 + √β̄_n ε, loss = ‖ε_θ(x_n, n) − ε‖² (mean),
or the L1 norm. The timesteps, the noise and the dropout RNG of step s on rank r
come from generators seeded by (seed, s, r): nothing random depends on history,
which is what makes a resumed run equal an uninterrupted one.

The timesteps and the noise are drawn on the device of the batch, by a generator on that
device (no host-to-device copy per step). CPU and CUDA generators give different numbers
for the same seed, so training on a GPU draws another noise stream than on the CPU (the CPU
stream is unchanged from earlier versions; the CUDA stream changed in issue 22, when noise
moved from the host to the device): runs are reproducible and resumable per device type.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from adpm_dist.diffusion.forward import q_sample
from adpm_dist.diffusion.schedule import Schedule


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed for (seed, step, rank, stream): independent of history and world order."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank), int(stream)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def draw_noise(
    shape: tuple[int, ...], num_timesteps: int, seed: int, step: int, rank: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, ε) for one step on one rank: n ~ U{1..N} (int64, [B]), ε ~ N(0, I) (float32),
    drawn on ``device`` by a generator on that device seeded by (seed, step, rank). The
    numbers depend on the device type (CPU and CUDA generators differ), not on the device index.
    """
    g = torch.Generator(device=device)
    g.manual_seed(step_seed(seed, step, rank))
    n = torch.randint(1, num_timesteps + 1, (shape[0],), generator=g, dtype=torch.int64,
                      device=device)
    eps = torch.randn(shape, generator=g, dtype=torch.float32, device=device)
    return n, eps


def diffuse(
    x0: torch.Tensor, n: torch.Tensor, eps: torch.Tensor, schedule: Schedule
) -> torch.Tensor:
    """x_n = √ᾱ_n x_0 + √β̄_n ε: the one forward process, :func:`diffusion.forward.q_sample`."""
    return q_sample(schedule, x0, n, eps)


def eps_loss(pred: torch.Tensor, eps: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean over every element (L_simple); 'l1' for the absolute error."""
    pred = pred.float()
    if kind == "mse":
        return F.mse_loss(pred, eps)
    if kind == "l1":
        return F.l1_loss(pred, eps)
    raise ValueError(f"unknown loss '{kind}'; choose 'mse' or 'l1'")


def training_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    schedule: Schedule,
    *,
    seed: int,
    step: int,
    rank: int,
    kind: str = "mse",
) -> torch.Tensor:
    """The loss of one step on one rank (what the engine backpropagates)."""
    n, eps = draw_noise(tuple(x0.shape), schedule.num_timesteps, seed, step, rank, device=x0.device)
    x_n = diffuse(x0.float(), n, eps, schedule)
    dtype = next(model.parameters()).dtype
    # Dropout draws from the global RNG: seed it per step too, or resume would differ.
    torch.manual_seed(step_seed(seed, step, rank, stream=1))
    pred = model(x_n.to(dtype), n)
    return eps_loss(pred, eps, kind)
