"""GPU tier for issue 22 item 3 (the Γ job's and sampling's hot loops): noise stream 2 is the same
bits on CUDA as on CPU, the on-device Γ sums equal the host's to float64 rounding, and neither
loop synchronises with the host per batch (``torch.cuda.set_sync_debug_mode("error")``).

Marked ``gpu``; skips where torch sees no CUDA device. Not yet run on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adpm_dist.diffusion import noise
from adpm_dist.diffusion.analytic import step_variances
from adpm_dist.diffusion.samplers import run_reverse
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.diffusion.trajectory import make_trajectory
from adpm_dist.gamma import GammaFile
from adpm_dist.gamma.accumulate import DeviceSums
from adpm_dist.gamma.moments import pair_errors_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False); "
                              "run on a GPU machine: make test-gpu or tools/gpu_check.sh"),
]


def test_stream_2_is_the_same_bits_on_cuda_as_on_cpu():
    keys = noise.image_keys(range(37))
    cpu = noise.counter_normal(keys, 5, (3, 32, 32), torch.float64, "cpu")
    gpu = noise.counter_normal(keys, 5, (3, 32, 32), torch.float64, "cuda")
    assert torch.equal(gpu.cpu(), cpu)


def _toy_eps(x, n):
    return 0.5 * x + 1e-3 * n.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def test_sampling_loop_draws_without_host_syncs_and_matches_cpu():
    sched = make_schedule("linear", 100)
    steps = step_variances(sched, make_trajectory("even", sched, 10), "ddpm-tilde")
    seeds = list(range(16))
    want = run_reverse(_toy_eps, sched, steps, noise.CounterNoise(seeds), (3, 8, 8), dtype=torch.float64)
    run_reverse(_toy_eps, sched, steps, noise.CounterNoise(seeds), (3, 8, 8), dtype=torch.float64,
                device="cuda")  # warm-up (allocations, lazy init)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run_reverse(_toy_eps, sched, steps, noise.CounterNoise(seeds), (3, 8, 8), dtype=torch.float64,
                          device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


def test_device_sums_on_cuda_equal_the_host_to_float64_rounding_without_syncs():
    sched = make_schedule("linear", 10)
    rng = np.random.default_rng(0)
    host = GammaFile.empty(sched, {"digest": "x"}, moments=True, halves=True)
    dev_gf = GammaFile.empty(sched, {"digest": "x"}, moments=True, halves=True)
    acc = DeviceSums(dev_gf, "cuda")
    batches = []
    for _ in range(5):
        t = rng.integers(1, 11, 40)
        t[:3] = 1
        x0, e, eh = (torch.from_numpy(rng.normal(size=(40, 2, 4))) for _ in range(3))
        batches.append((t, x0, e, eh, torch.from_numpy(rng.uniform(0, 2, 40)), torch.from_numpy(t % 2)))
    cuda = [(t, *(v.cuda() for v in rest)) for t, *rest in batches]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t, x0, e, eh, v, half in cuda:
            t_dev = torch.from_numpy(t).to("cuda", non_blocking=True)
            acc.add(t_dev, v, pair_errors_device(sched, x0, t_dev, e, eh, t), half=half)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    acc.sync()
    for t, x0, e, eh, v, half in batches:
        errors = pair_errors_device(sched, x0, torch.from_numpy(t), e, eh, t)
        host.add(t, v.numpy(), {k: x.numpy() for k, x in errors.items()}, half=half.numpy())
    for got, want in ((dev_gf, host), (dev_gf.half, host.half)):
        np.testing.assert_array_equal(got.count, want.count)
        np.testing.assert_allclose(got.sum, want.sum, rtol=1e-14)
        np.testing.assert_allclose(got.moments.per_t, want.moments.per_t, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(got.moments.scalars, want.moments.scalars, rtol=1e-13)
