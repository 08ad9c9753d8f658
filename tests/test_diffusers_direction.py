"""The DDIM direction switch inside diffusers pipelines: ``use_clipped_model_output`` and the
scheduler's ``ddim_direction`` give exactly our sampler's ``direction='x0'``/``'network'``."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from adpm_dist.diffusion.samplers import make_generators
from adpm_dist.diffusion.samplers import sample as our_sample
from adpm_dist.diffusion.trajectory import make_trajectory
from adpm_dist.integrations.diffusers.scheduler import AnalyticDPMScheduler
from adpm_dist.models.diffusers_adapter import schedule_from_diffusers
from tests.test_diffusers_interop import setup, tiny_unet  # noqa: F401 (a fixture)

N, K, SEEDS = 20, 5, list(range(7, 11))


@pytest.fixture(scope="module")
def pipe():
    unet = tiny_unet(3)
    return diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(
        num_train_timesteps=N, beta_start=1e-3, beta_end=0.2))


def run_pipe(pipe, use_clipped, direction) -> np.ndarray:
    pipe.scheduler = AnalyticDPMScheduler(num_train_timesteps=N, beta_start=1e-3, beta_end=0.2,
                                          method="ddim", ddim_direction=direction)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=len(SEEDS), generator=make_generators(SEEDS), num_inference_steps=K, eta=0.0,
                use_clipped_model_output=use_clipped, output_type="np").images


def ours(pipe, direction) -> np.ndarray:
    sched = schedule_from_diffusers({"num_train_timesteps": N, "beta_start": 1e-3, "beta_end": 0.2,
                                     "beta_schedule": "linear"}, "test")
    unet = pipe.unet

    def eps(x, n):
        return unet(x, n - 1).sample  # diffusers timesteps are 0-based

    with torch.no_grad():
        x = our_sample(eps, sched, make_trajectory("even", sched, K), "ddim", make_generators(SEEDS),
                       (1, 8, 8), direction=direction)
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_pipeline_direction_equals_our_sampler(pipe):
    network, rederived = ours(pipe, "network"), ours(pipe, "x0")
    assert not np.array_equal(network, rederived)  # the clip binds on this model: the switch matters
    np.testing.assert_array_equal(run_pipe(pipe, False, "x0"), network)  # diffusers' False: raw ε̂
    np.testing.assert_array_equal(run_pipe(pipe, True, "network"), rederived)
    np.testing.assert_array_equal(run_pipe(pipe, None, "network"), network)  # None: the config
    np.testing.assert_array_equal(run_pipe(pipe, None, "x0"), rederived)


def test_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="ddim_direction"):
        AnalyticDPMScheduler(num_train_timesteps=N, ddim_direction="sideways")


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("method,direction", [("residual-ddpm", "x0"), ("residual-ddim", "network")])
def test_residual_methods_in_a_pipeline_equal_our_sampler(setup, method, direction):  # noqa: F811
    """from_gamma_file copies the Γ file's model-error moments; the pipeline's images then equal
    our sampler's with the same moments, bit for bit."""
    from adpm_dist.gamma import read_gamma
    from adpm_dist.models.loading import eps_function, load_checkpoint

    loaded = load_checkpoint(f"diffusers:{setup['folder']}")
    gf = read_gamma(setup["gamma"])
    seeds, k = list(range(40, 44)), 5
    tau = make_trajectory("even", loaded.schedule, k)
    want = our_sample(eps_function(loaded.model, torch.device("cpu")), loaded.schedule, tau, method,
                      make_generators(seeds), (1, 8, 8), gamma=gf.gamma_vector(), moments=gf.error_moments(),
                      direction=direction)
    family = diffusers.DDPMPipeline if method == "residual-ddpm" else diffusers.DDIMPipeline
    pipe = family.from_pretrained(setup["folder"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = AnalyticDPMScheduler.from_gamma_file(gf, dict(pipe.scheduler.config), method=method,
                                                          ddim_direction=direction)
    kw = {"eta": 0.0} if method == "residual-ddim" else {}
    images = pipe(batch_size=len(seeds), generator=make_generators(seeds), num_inference_steps=k,
                  output_type="np", **kw).images
    np.testing.assert_array_equal(images, (want / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())


def test_residual_method_without_moments_is_refused():
    with pytest.raises(ValueError, match="model_error_moments"):
        AnalyticDPMScheduler(num_train_timesteps=N, method="residual-ddpm")
    with pytest.raises(ValueError, match=r"model_error_moments\['b'\] needs N=20"):
        AnalyticDPMScheduler(num_train_timesteps=N, method="residual-ddim",
                             model_error_moments={"a": [0.1] * N, "b": [0.0] * 3, "c": [1.0] * N})
