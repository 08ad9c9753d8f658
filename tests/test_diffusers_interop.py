"""diffusers interoperability, end to end: a random UNet2DModel folder → our Γ estimate →
images from our sampler, our sample CLI and diffusers pipelines with AnalyticDPMScheduler.

What is equal, precisely: with one generator per image (seed + i) passed to the pipeline
as a list, the pipeline's float output ``(x/2 + 0.5).clamp(0, 1)`` equals, bit for bit,
the same transform of ``samplers.sample(...)`` on the same batch; and the sample CLI's
PNGs equal ``to_uint8`` of that same tensor (the CLI run in one batch of the same size).
"""

from __future__ import annotations

# The diffusers extra is installed by `make test`: a missing one fails, never skips.
import diffusers
import numpy as np
import pytest
import torch

from adpm_dist.diffusion.samplers import make_generators  # noqa: E402
from adpm_dist.diffusion.samplers import sample as our_sample  # noqa: E402
from adpm_dist.diffusion.trajectory import make_trajectory  # noqa: E402
from adpm_dist.gamma import read_gamma  # noqa: E402
from adpm_dist.integrations.diffusers.scheduler import AnalyticDPMScheduler  # noqa: E402
from adpm_dist.models.loading import eps_function, load_checkpoint  # noqa: E402
from adpm_dist.stages import estimate, sample  # noqa: E402
from tests.estimate_helpers import make_digit_shards  # noqa: E402

N = 20


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4)
    with torch.no_grad():  # make sure no layer is zero-initialised (ε ≡ 0 would make Γ trivial)
        for p in unet.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5 / p[0].numel() ** 0.5)
    return unet.eval()


def save_folder(path, prediction_type: str = "epsilon", seed: int = 0) -> str:
    unet = tiny_unet(seed)
    sched = diffusers.DDPMScheduler(num_train_timesteps=N, beta_start=1e-3, beta_end=0.2,
                                    prediction_type=prediction_type)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    folder = save_folder(root / "model")
    data = make_digit_shards(str(root / "shards"), limit=150, shard_size=30)
    gamma = root / "gamma.json"
    assert estimate.main(["--checkpoint", f"diffusers:{folder}", "--data", data, "--out", str(gamma),
                          "--samples-per-t", "60", "--num-workers", "0", "--no-progress",
                          "--batch-size", "128"]) == 0
    return {"root": root, "folder": folder, "gamma": str(gamma)}


def ours(loaded, gf, method: str, seeds, k: int, eta: float = 0.0) -> torch.Tensor:
    tau = make_trajectory("even", loaded.schedule, k)
    return our_sample(eps_function(loaded.model, torch.device("cpu")), loaded.schedule, tau, method,
                      make_generators(seeds), (1, 8, 8), gamma=gf.gamma_vector(), eta=eta)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("family", ["ddpm", "ddim"])
def test_pipeline_equals_our_sampler_and_cli(setup, family):
    loaded = load_checkpoint(f"diffusers:{setup['folder']}")
    gf = read_gamma(setup["gamma"])
    assert gf.model["digest"] == loaded.digest
    assert np.all(gf.gamma > 0) and np.all(np.isfinite(gf.gamma))
    method, seeds, k = f"analytic-{family}", list(range(100, 106)), 6
    expected = ours(loaded, gf, method, seeds, k)

    pipe_cls = diffusers.DDPMPipeline if family == "ddpm" else diffusers.DDIMPipeline
    pipe = pipe_cls.from_pretrained(setup["folder"])
    pipe.set_progress_bar_config(disable=True)
    sched_cfg = dict(pipe.scheduler.config)
    pipe.scheduler = AnalyticDPMScheduler.from_gamma_file(gf, sched_cfg, method=method)
    kw = {"eta": 0.0} if family == "ddim" else {}
    images = pipe(batch_size=len(seeds), generator=make_generators(seeds), num_inference_steps=k,
                  output_type="np", **kw).images
    want = (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == want.shape
    np.testing.assert_array_equal(images, want)
    assert np.unique(want).size > 50  # real images, not a constant

    # A different seed gives a different image (the comparison could fail).
    other = pipe(batch_size=1, generator=make_generators([999]), num_inference_steps=k, output_type="np",
                 **kw).images
    assert not np.array_equal(other[0], images[0])

    out = setup["root"] / f"cli-{family}"
    assert sample.main(["--checkpoint", f"diffusers:{setup['folder']}", "--gamma", setup["gamma"],
                        "--method", method, "--steps", str(k), "--num-samples", str(len(seeds)),
                        "--out", str(out), "--seed", str(seeds[0]), "--batch-size", str(len(seeds)),
                        # stream 1 draws each image's noise from its own torch.Generator, like the
                        # diffusers pipeline above; the default stream 2 is a different (batched) stream
                        "--noise-stream", "1", "--no-progress"]) == 0
    cli = np.stack(sample.read_first_images(str(out), len(seeds)))
    np.testing.assert_array_equal(cli.reshape(len(seeds), 8, 8, 1), sample.to_uint8(expected))


@pytest.mark.timeout(60)
def test_scheduler_config_round_trip(tmp_path):
    gamma = [0.1 * i + 0.01 for i in range(1, N + 1)]
    s = AnalyticDPMScheduler(num_train_timesteps=N, beta_start=1e-3, beta_end=0.2, gamma=gamma,
                             method="analytic-ddim", eta=0.5, trajectory="quadratic", clip_pixel=2.0)
    s.save_pretrained(str(tmp_path))
    r = AnalyticDPMScheduler.from_pretrained(str(tmp_path))
    assert r.config.gamma == gamma and r.config.method == "analytic-ddim" and r.config.eta == 0.5
    assert r.config.trajectory == "quadratic" and r.config.clip_pixel == 2.0
    np.testing.assert_array_equal(r.schedule.betas, s.schedule.betas)
    r.set_timesteps(5)
    s.set_timesteps(5)
    assert r.timesteps.tolist() == s.timesteps.tolist() == [19, 11, 5, 1, 0]  # τ = round(1 + 19(k/4)²) − 1
    assert r._steps == s._steps
    with pytest.raises(ValueError, match="gamma has 3 entries"):
        AnalyticDPMScheduler(num_train_timesteps=N, gamma=[0.5] * 3)
    with pytest.raises(ValueError, match="unknown method"):
        AnalyticDPMScheduler(num_train_timesteps=N, method="euler")


@pytest.mark.slow
def test_a_partial_gamma_file_is_refused_by_the_scheduler(setup):
    # Partial Γ files (estimate --timesteps even:…) serve our CLIs, but a diffusers
    # config cannot say "unknown" and may be asked for any K later: refuse, never Γ = 0.
    gf = read_gamma(setup["gamma"])
    gf.count[5:] = 0
    cfg = {"num_train_timesteps": gf.num_timesteps, "beta_schedule": "linear"}
    with pytest.raises(ValueError, match=r"lacks \d+ timesteps .*--timesteps all"):
        AnalyticDPMScheduler.from_gamma_file(gf, cfg)


def test_a_diffusers_folder_loads_from_s3_and_file_urls(tmp_path, s3_bucket):
    from adpm_dist.io import storage
    from adpm_dist.models.diffusers_adapter import DiffusersError

    folder = save_folder(tmp_path / "model", seed=3)
    url = f"{s3_bucket}/hub/model"
    storage.upload_dir(folder, url)
    local = load_checkpoint(f"diffusers:{folder}")
    remote = load_checkpoint(f"diffusers:{url}")
    via_file = load_checkpoint(f"diffusers:file://{folder}")
    assert remote.source == url and remote.name == "diffusers:model"
    # The same network and schedule: the same digest and the same ε, bit for bit.
    assert remote.digest == local.digest == via_file.digest
    assert remote.schedule.betas_sha256() == local.schedule.betas_sha256()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    n = torch.tensor([1, 7, N])
    with torch.no_grad():
        assert torch.equal(remote.model(x, n), local.model(x, n))
    # A remote folder without a scheduler config is refused with the URL, not a temp path.
    storage.remove(f"{url}/scheduler", recursive=True)
    with pytest.raises(DiffusersError, match=f"{url}: no scheduler"):
        load_checkpoint(f"diffusers:{url}")
    with pytest.raises(DiffusersError, match="not found or empty"):
        load_checkpoint(f"diffusers:{s3_bucket}/hub/nothing-here")
