"""Device discipline on CPU (issue 16): the EMA lives and updates where the engine's module
lives, sample grids draw with generators on the model's device, and collectives pick the
backend's device (NCCL: CUDA). The same paths on a GPU: tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from adpm_dist.io import dist
from adpm_dist.train import loop as train
from adpm_dist.train.config import build_config, preset_path
from adpm_dist.train.ema import EMA


@pytest.mark.parametrize("backend, kind", [("nccl", "cuda"), ("gloo", "cpu")])
def test_collectives_use_the_backends_device(backend, kind):
    assert dist.collective_device(backend).type == kind


def test_all_reduce_sum_returns_the_tensor_on_its_own_device():
    """In a one-member gloo group: a tensor already on the backend's device is reduced in place."""
    from adpm_dist.train.engine import forget_deepspeed_groups, prepare_deepspeed

    prepare_deepspeed()
    dist.init_group()
    try:
        assert dist.collective_device() == torch.device("cpu")
        t = torch.tensor([1.5, 2.0], dtype=torch.float64)
        ptr = t.data_ptr()
        assert dist.all_reduce_sum(t) is t and t.data_ptr() == ptr
        assert t.tolist() == [1.5, 2.0]
    finally:
        dist.shutdown()
        forget_deepspeed_groups()


def test_ema_refuses_weights_on_another_device_instead_of_copying_them():
    """A cross-device update would be a host copy of every parameter per step: an error instead."""
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9).to("meta")
    assert ema.device.type == "meta"
    with pytest.raises(ValueError, match="EMA on meta but the weights are on cpu"):
        ema.update(list(net.parameters()))


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("zero", [1, 3])
def test_trainer_ema_lives_on_the_engines_device_and_updates_in_place(digits, tmp_path, zero):
    """The EMA sits next to the engine's module, updates its own storage in place (no new
    tensors, no copies) and the sample grid (sample_every > 0) draws on that device."""
    from adpm_dist.train.engine import forget_deepspeed_groups, module_device, prepare_deepspeed

    cfg = build_config(str(preset_path("tiny")), [
        f"data.urls=[{digits}]", f"train.run_dir={tmp_path / 'run'}", "train.total_steps=3",
        "train.ckpt_every=100", "data.batch_size=8", f"train.zero_stage={zero}",
        "train.sample_every=2", "train.sample_steps=3", "train.sample_count=2"])
    prepare_deepspeed()
    info = dist.init_group()
    try:
        trainer = train.Trainer(cfg, info)
        assert trainer.ema.device == module_device(trainer.engine) == trainer.device
        ptrs = [p.data_ptr() for p in trainer.ema.model.parameters()]
        before = [p.clone() for p in trainer.ema.model.parameters()]
        assert trainer.fit() == 0
        after = list(trainer.ema.model.parameters())
        assert [p.data_ptr() for p in after] == ptrs
        assert any(not torch.equal(a, b) for a, b in zip(after, before))  # it did update
        assert (tmp_path / "run" / "samples" / "step_00000002.png").stat().st_size > 0
    finally:
        dist.shutdown()
        forget_deepspeed_groups()


def test_sample_grid_generators_follow_the_device(monkeypatch):
    """sample_grid_png asks for its generators on the model's device (CPU vs CUDA generators
    draw different numbers: a grid is reproducible per device type, docs/train.md)."""
    from adpm_dist.diffusion import samplers
    from adpm_dist.diffusion.schedule import make_schedule
    from adpm_dist.models.registry import build_model
    from adpm_dist.train.grid import sample_grid_png

    seen = []
    real = samplers.make_generators

    def spy(seeds, device=None):  # None: the caller left the device to the default (CPU)
        seen.append(device)
        return real(seeds, device=device or "cpu")

    monkeypatch.setattr(samplers, "make_generators", spy)
    model = build_model("tiny")
    png = sample_grid_png(model.eval(), make_schedule("linear", 1000), dict(model.config),
                          steps=2, count=2, seed=0, device=torch.device("cpu"))
    assert png[:4] == b"\x89PNG" and seen == [torch.device("cpu")]
