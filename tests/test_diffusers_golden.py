"""AnalyticDPMScheduler against hand formulas in mpmath, and the adapter's prediction_type handling.

Golden values are computed here from the paper's formulas (Eq. 7/9/14, Thm. 2 clip) in 50-digit
mpmath, not by calling the code under test.
"""

from __future__ import annotations

import json

# The diffusers extra is installed by `make test`: a missing one fails, never skips.
import diffusers
import mpmath as mp
import numpy as np
import pytest
import torch

from adpm_dist.integrations.diffusers.scheduler import AnalyticDPMScheduler  # noqa: E402
from adpm_dist.models.diffusers_adapter import DiffusersError, schedule_from_diffusers  # noqa: E402
from adpm_dist.models.loading import load_checkpoint  # noqa: E402
from tests.test_diffusers_interop import save_folder  # noqa: E402

mp.mp.dps = 50
N, START, END, GAMMA = 10, 1e-3, 0.2, 0.5


def abar(n: int):
    betas = [mp.mpf(START) + (mp.mpf(END) - mp.mpf(START)) * i / (N - 1) for i in range(N)]
    out = mp.mpf(1)
    for b in betas[:n]:
        out *= 1 - b
    return out


def golden_step(x, e, z, s, t, family, eta=0):
    """(x̂₀, x_s) for one step t → s by the paper's formulas, elementwise on python floats."""
    a_s, a_t = abar(s), abar(t)
    b_s, b_t = 1 - a_s, 1 - a_t
    beta_ts = 1 - a_t / a_s
    tilde = b_s * beta_ts / b_t
    cov = min(b_t / a_t * (1 - GAMMA), mp.mpf(1), b_t / a_t)  # Thm. 2 clip to ((b−a)/2)² = 1
    if family == "ddpm":
        lam2, gam2 = tilde, a_s * beta_ts**2 / b_t**2
    else:
        lam2 = mp.mpf(eta) ** 2 * tilde
        gam2 = (mp.sqrt(a_s) - mp.sqrt((b_s - lam2) * a_t / b_t)) ** 2
    sig2 = lam2 + gam2 * cov
    x0 = [(xi - mp.sqrt(b_t) * ei) / mp.sqrt(a_t) for xi, ei in zip(x, e)]
    prev = [mp.sqrt(a_s) * x0i + mp.sqrt(b_s - lam2) * (xi - mp.sqrt(a_t) * x0i) / mp.sqrt(b_t)
            + mp.sqrt(sig2) * zi for xi, x0i, zi in zip(x, x0, z)]
    return [float(v) for v in x0], [float(v) for v in prev]


@pytest.mark.parametrize("family,eta", [("ddpm", None), ("ddim", None), ("ddim", 1.0)])
def test_step_matches_hand_formula(family, eta):
    sched = AnalyticDPMScheduler(num_train_timesteps=N, beta_start=START, beta_end=END,
                                 gamma=[GAMMA] * N, method=f"analytic-{family}", clip_sample=False)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [9, 6, 3, 0]  # τ = 1, 4, 7, 10 (even), 0-based
    g = torch.Generator().manual_seed(3)
    x, e, z = (torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64) * 0.3 for _ in range(3))
    kw = {} if eta is None else {"eta": eta}
    out = sched.step(e, 6, x, variance_noise=z, **kw)  # our t = 7 → s = 4
    gx0, gprev = golden_step(x.flatten().tolist(), e.flatten().tolist(), z.flatten().tolist(), 4, 7,
                             family, eta or 0)
    np.testing.assert_allclose(out.pred_original_sample.flatten().numpy(), gx0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.prev_sample.flatten().numpy(), gprev, rtol=1e-10, atol=1e-12)
    # The last step returns x̂₀ (the mean of p(x₀|x_{τ_1})) and adds no noise.
    last = sched.step(e, 0, x, return_dict=False)
    gx0_1, _ = golden_step(x.flatten().tolist(), e.flatten().tolist(), [0.0] * 8, 0, 1, "ddpm")
    np.testing.assert_allclose(last[0].flatten().numpy(), gx0_1, rtol=1e-12)
    # One generator for the whole batch (diffusers' default) is reproducible, and noise is added.
    one = [sched.step(e, 6, x, generator=torch.Generator().manual_seed(5), **kw).prev_sample for _ in "ab"]
    assert torch.equal(one[0], one[1]) and not torch.allclose(one[0], out.prev_sample)
    with pytest.raises(ValueError, match="not on the trajectory"):
        sched.step(e, 5, x)


def test_add_noise_and_schedules_match_diffusers():
    for kind in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        ref = diffusers.DDPMScheduler(num_train_timesteps=50, beta_schedule=kind)
        ours = schedule_from_diffusers(dict(ref.config))
        np.testing.assert_allclose(ours.betas[1:], ref.betas.double().numpy(), rtol=1e-6)
        assert kind in ours.name
    ref = diffusers.DDPMScheduler(num_train_timesteps=N, beta_start=START, beta_end=END)
    sched = AnalyticDPMScheduler(num_train_timesteps=N, beta_start=START, beta_end=END)
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 4, 9])
    np.testing.assert_allclose(sched.add_noise(x0, noise, t).numpy(), ref.add_noise(x0, noise, t).numpy(),
                               rtol=1e-5, atol=1e-6)
    assert sched.scale_model_input(x0, 3) is x0 and sched.init_noise_sigma == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("ptype", ["v_prediction", "sample"])
def test_prediction_type_converted_exactly(tmp_path, ptype):
    folder = save_folder(tmp_path / "m", prediction_type=ptype)
    loaded = load_checkpoint(f"diffusers:{folder}")
    ref = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet = diffusers.UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    n = torch.tensor([1, 7, 20])
    with torch.no_grad():
        got = loaded.model(x, n)
        raw = unet(x, n - 1).sample
    a = ref.alphas_cumprod[n - 1].reshape(-1, 1, 1, 1)
    if ptype == "v_prediction":
        want = a.sqrt() * raw + (1 - a).sqrt() * x
    else:
        want = (x - a.sqrt() * raw) / (1 - a).sqrt()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Also: the eps model under epsilon returns the UNet output at t = n − 1 unchanged.
    eps_folder = save_folder(tmp_path / "e")
    eps_model = load_checkpoint(f"diffusers:{eps_folder}").model
    with torch.no_grad():
        torch.testing.assert_close(eps_model(x, n), unet(x, n - 1).sample)
        assert not torch.equal(eps_model(x, n), unet(x, n).sample)


def test_refusals_and_digest(tmp_path):
    folder = save_folder(tmp_path / "m")
    a, b = load_checkpoint(f"diffusers:{folder}"), load_checkpoint(f"diffusers:{folder}")
    assert a.digest == b.digest and len(a.digest) == 64
    assert load_checkpoint(f"diffusers:{save_folder(tmp_path / 'other', seed=1)}").digest != a.digest
    cfg_path = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "flow"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(DiffusersError, match="scheduler_config.json: prediction_type 'flow'"):
        load_checkpoint(f"diffusers:{folder}")
    with pytest.raises(DiffusersError, match="not a diffusers folder"):
        load_checkpoint(f"diffusers:{tmp_path}")
    with pytest.raises(ValueError, match="only 'epsilon'"):
        AnalyticDPMScheduler(num_train_timesteps=N, prediction_type="v_prediction")
