"""Training noise drawn on the batch's device and q_sample without host round trips (issue 22,
item 3): the CPU stream is unchanged, and q_sample never moves its timesteps to the host."""

from __future__ import annotations

import numpy as np
import torch

from adpm_dist.diffusion.forward import abar_table, q_sample
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.train.objective import draw_noise, step_seed


def test_cpu_noise_stream_is_the_one_drawn_before_noise_moved_to_the_device():
    """The pre-issue-22 draw (a CPU generator, timesteps then noise), written out here."""
    for seed, step, rank in [(0, 0, 0), (7, 123, 3)]:
        g = torch.Generator(device="cpu").manual_seed(step_seed(seed, step, rank))
        n_old = torch.randint(1, 1001, (5,), generator=g, dtype=torch.int64)
        eps_old = torch.randn((5, 1, 4, 4), generator=g, dtype=torch.float32)
        n, eps = draw_noise((5, 1, 4, 4), 1000, seed, step, rank, device="cpu")
        assert torch.equal(n, n_old) and torch.equal(eps, eps_old)
        assert n.device.type == eps.device.type == "cpu"


def test_q_sample_equals_float64_numpy_and_keeps_timesteps_on_their_device():
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 3, 3, generator=g) * 2 - 1
    eps = torch.randn(6, 1, 3, 3, generator=g)
    n = torch.tensor([1, 2, 500, 999, 1000, 17])
    abar = np.array(schedule.alphas_cumprod)[n.numpy()].reshape(-1, 1, 1, 1)
    want = np.sqrt(abar) * x0.double().numpy() + np.sqrt(1 - abar) * eps.double().numpy()
    got = q_sample(schedule, x0.double(), n, eps.double())
    assert np.allclose(got.numpy(), want, rtol=0, atol=1e-15)
    # One table per schedule and device, reused; on the meta device any host copy of the
    # timesteps (the old ``n.cpu()``) would raise, so this proves the indexing stays there.
    assert abar_table(schedule, "cpu") is abar_table(schedule, "cpu")
    meta = q_sample(schedule, x0.to("meta"), n.to("meta"), eps.to("meta"))
    assert meta.device.type == "meta" and meta.shape == x0.shape
