"""``train.compile`` (issue 22, item 3): the engine's ε-network goes through torch.compile in
place (DeepSpeed's ``engine.compile``), so parameter names, and with them checkpoints and the
EMA's order, do not change. Off by default. The compiled step itself runs in the GPU tier;
on CPU inductor's C++ build is too slow for this suite."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.timeout(120)
def test_train_compile_flag_compiles_the_module_in_place():
    from adpm_dist.io import dist
    from adpm_dist.models.registry import build_model
    from adpm_dist.train.config import build_config
    from adpm_dist.train.engine import build_engine, forget_deepspeed_groups, prepare_deepspeed

    cfg = build_config(preset="tiny", overrides=["data.batch_size=4", "train.compile=true"])
    assert build_config(preset="tiny").train.compile is False  # off unless asked for
    prepare_deepspeed()
    dist.init_group()
    try:
        torch.manual_seed(0)
        engine = build_engine(cfg, build_model("tiny"), 1)
        assert engine.is_compiled and engine.module._compiled_call_impl is not None
        assert list(engine.module.state_dict()) == list(build_model("tiny").state_dict())
    finally:
        dist.shutdown()
        forget_deepspeed_groups()
