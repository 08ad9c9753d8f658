"""The imperfect mixture oracle ε̂ = k·ε* + o (adpm_dist.models.oracle) that the model-error tests
stand on: saved and loaded through a checkpoint, and the exact oracle unchanged by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adpm_dist.models.io import model_digest, save_model
from adpm_dist.models.loading import load_checkpoint
from adpm_dist.models.oracle import two_cluster_mixture

SPEC = {"name": "linear", "num_timesteps": 100}


def test_imperfect_oracle_round_trips_through_a_checkpoint(tmp_path):
    exact = two_cluster_mixture(4, SPEC)
    assert set(exact.config) == {"type", "means", "stds", "weights", "schedule", "shape"}  # as before
    bad = two_cluster_mixture(4, SPEC, eps_scale=0.8, eps_offset=0.1)
    assert bad.config["eps_scale"] == 0.8 and bad.config["eps_offset"] == 0.1
    save_model(bad, tmp_path / "bad.safetensors")
    loaded = load_checkpoint(str(tmp_path / "bad.safetensors"))
    assert loaded.digest == model_digest(bad) != model_digest(exact)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.arange(1, 17) * 6
    with torch.no_grad():
        want = 0.8 * exact(x, t) + 0.1
        np.testing.assert_allclose(loaded.model(x, t).numpy(), want.numpy(), rtol=1e-12, atol=1e-15)
        # the default is the exact ε*, with no arithmetic added (bit for bit)
        same = two_cluster_mixture(4, SPEC, eps_scale=1.0, eps_offset=0.0)
        assert torch.equal(same(x, t), exact(x, t)) and model_digest(same) == model_digest(exact)


@pytest.mark.parametrize("bad", [{"eps_scale": float("nan")}, {"eps_offset": float("inf")}])
def test_non_finite_scale_or_offset_is_refused(bad):
    with pytest.raises(ValueError, match="eps_scale and eps_offset must be finite"):
        two_cluster_mixture(4, SPEC, **bad)
