"""Schedules and trajectories: float64, ranges, shapes of the even/quadratic rules."""

import numpy as np
import pytest

from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.diffusion.trajectory import make_trajectory
from tests.oracle_truth import abar_from_betas


def test_linear_schedule_is_float64_and_matches_ho_et_al():
    s = make_schedule("linear", 1000)
    assert s.betas.dtype == np.float64 and s.alphas_cumprod.dtype == np.float64
    assert s.betas[1] == 1e-4 and s.betas[1000] == pytest.approx(0.02, rel=1e-15)
    assert s.alphas_cumprod[0] == 1.0 and s.betas[0] == 0.0
    np.testing.assert_allclose(s.alphas_cumprod, abar_from_betas(s.betas[1:]), rtol=1e-13)


def test_cosine_keeps_tiny_abar_that_float32_would_lose():
    s = make_schedule("cosine", 1000)
    assert 0 < s.alphas_cumprod[-1] < 1e-7  # ~2e-9: below float32's resolution next to 1
    assert s.betas.max() <= 0.999
    assert np.float32(1.0 - s.alphas_cumprod[-1]) == np.float32(1.0)


@pytest.mark.parametrize("n", [10, 4000])
def test_extreme_lengths_work(n):
    for name in ("linear", "cosine"):
        assert make_schedule(name, n).num_timesteps == n


@pytest.mark.parametrize("n", [9, 4001])
def test_lengths_out_of_range_are_refused(n):
    with pytest.raises(ValueError, match="num_timesteps"):
        make_schedule("linear", n)


def test_custom_betas_and_bad_names():
    s = make_schedule("mine", betas=np.full(12, 0.05))
    assert s.num_timesteps == 12 and s.name == "mine"
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("quadratic-ish", 100)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        make_schedule("bad", betas=[0.1] * 11 + [1.5])


def test_betas_sha256_depends_on_values():
    a, b = make_schedule("linear", 100), make_schedule("cosine", 100)
    assert a.betas_sha256() != b.betas_sha256()
    assert a.betas_sha256() == make_schedule("linear", 100).betas_sha256()


@pytest.mark.parametrize("n", [10, 20, 1000])
def test_even_and_quadratic_trajectories_for_every_k(n):
    s = make_schedule("linear", n)
    for k in (range(2, n + 1) if n <= 20 else (2, 3, 10, 100, 999, 1000)):
        for kind in ("even", "quadratic"):
            tau = make_trajectory(kind, s, k)
            assert len(tau) == k and tau[0] == 1 and tau[-1] == n and np.all(np.diff(tau) > 0)
    tau = make_trajectory("even", s, 4)
    want = [int(np.floor(1 + (n - 1) * i / 3 + 0.5)) for i in range(4)]
    assert tau.tolist() == want


def test_k_out_of_range_is_refused():
    s = make_schedule("linear", 50)
    for k in (1, 51):
        with pytest.raises(ValueError, match="2 <= K <= N"):
            make_trajectory("even", s, k)
    with pytest.raises(ValueError, match="needs a Γ"):
        make_trajectory("optimal", s, 5)
