"""ε-networks: the DDPM UNet, its presets, the registry and safetensors checkpoints."""

from __future__ import annotations

import inspect
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.models import registry
from adpm_dist.models.io import (
    load_model,
    model_digest,
    model_from_bytes,
    model_to_bytes,
    save_model,
    state_dict_fp32,
)
from adpm_dist.models.registry import PRESETS, build_model, register_model_type
from adpm_dist.models.unet import AttnBlock, UNet, count_parameters, timestep_embedding

# ---------------------------------------------------------------------------- helpers


def expected_parameter_count(cfg: dict) -> tuple[int, int]:
    """(parameters, attention blocks) of a DDPM UNet, by arithmetic on the architecture.

    Derived from the paper's description, not from the modules: conv k×k = k²·c_in·c_out
    + c_out, linear = c_in·c_out + c_out, GroupNorm = 2c; a residual block is
    GN, conv3, time projection, GN, conv3 (+ 1×1 shortcut when widths change);
    attention is GN + q, k, v, out 1×1 convs.
    """
    ch, temb = cfg["ch"], 4 * cfg["ch"]

    def conv(ci, co, k=3):
        return k * k * ci * co + co

    def res(ci, co):
        proj = temb * co * (2 if cfg["scale_shift_norm"] else 1) + co * (
            2 if cfg["scale_shift_norm"] else 1)
        return 2 * ci + conv(ci, co) + proj + 2 * co + conv(co, co) + (
            conv(ci, co, 1) if ci != co else 0)

    def attn(c):
        return 2 * c + 4 * conv(c, c, 1)

    size = cfg["pad_to"] or cfg["resolution"]
    attn_at = set(cfg["attn_resolutions"])
    total = (ch * temb + temb) + (temb * temb + temb) + conv(cfg["in_channels"], ch)
    n_attn = 1  # the middle block
    skips, cur, levels = [ch], ch, len(cfg["ch_mult"])
    for i, mult in enumerate(cfg["ch_mult"]):
        for _ in range(cfg["num_res_blocks"]):
            total += res(cur, ch * mult)
            cur = ch * mult
            if size in attn_at:
                total, n_attn = total + attn(cur), n_attn + 1
            skips.append(cur)
        if i != levels - 1:
            total += conv(cur, cur)
            skips.append(cur)
            size //= 2
    total += 2 * res(cur, cur) + attn(cur)
    for i in reversed(range(levels)):
        for _ in range(cfg["num_res_blocks"] + 1):
            total += res(cur + skips.pop(), ch * cfg["ch_mult"][i])
            cur = ch * cfg["ch_mult"][i]
            if size in attn_at:
                total, n_attn = total + attn(cur), n_attn + 1
        if i != 0:
            total += conv(cur, cur)
            size *= 2
    total += 2 * cur + conv(cur, cfg["out_channels"])
    return total, n_attn


def randomize_silent_layers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give DDPM's near-zero-initialised layers ordinary weights (a 'trained-like' net)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear) and module.weight.abs().max() < 1e-3:
                fan = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan**0.5)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model


def input_for(model: UNet, batch: int, seed: int = 0) -> torch.Tensor:
    c = model.config
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c["in_channels"], c["resolution"], c["resolution"], generator=gen)


def tiny(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return randomize_silent_layers(build_model("tiny"), seed).eval()


# ---------------------------------------------------------------------------- presets


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_and_runs_forward(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    assert json.loads(json.dumps(model.config)) == PRESETS[name]
    params, n_attn = expected_parameter_count(model.config)
    assert count_parameters(model) == params
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == n_attn

    x = input_for(model, batch=1)
    with torch.no_grad():
        eps = model(x, torch.tensor([1]))
    assert eps.shape == x.shape and eps.dtype == x.dtype
    assert torch.isfinite(eps).all()
    # DDPM initialisation: the last layer of every branch starts (almost) silent, so an
    # untrained network predicts ε ≈ 0 and every residual block is ≈ the identity.
    assert eps.abs().max() < 1e-3


def test_preset_parameter_budgets():
    counts = {name: count_parameters(build_model(name)) for name in ("tiny", "mnist", "cifar10")}
    assert counts["tiny"] < 200_000
    assert counts["mnist"] == 1_623_169
    # Ho et al. (2020), Appendix B: the CIFAR-10 model has 35.7M parameters.
    assert abs(counts["cifar10"] - 35.7e6) <= 0.1e6


@pytest.mark.slow
def test_pad_to_keeps_28px_but_computes_on_32px():
    torch.manual_seed(1)
    padded = randomize_silent_layers(build_model("mnist", dropout=0.0, pad_to=32,
                                                 attn_resolutions=[8])).eval()
    # The same weights in a plain 32×32 network, fed the zero-padded image by hand.
    plain = build_model("mnist", dropout=0.0, resolution=32, pad_to=None, attn_resolutions=[8]).eval()
    plain.load_state_dict(padded.state_dict())
    x = input_for(padded, batch=2)
    n = torch.tensor([3, 700])
    with torch.no_grad():
        eps = padded(x, n)
        by_hand = plain(F.pad(x, (2, 2, 2, 2)), n)[:, :, 2:30, 2:30]
    assert eps.shape == (2, 1, 28, 28)
    torch.testing.assert_close(eps, by_hand, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- forward


def test_timestep_embedding_matches_closed_form():
    n = torch.tensor([1, 7, 1000])
    emb = timestep_embedding(n, 8)
    half = 4
    for row, step in enumerate([1, 7, 1000]):
        for i in range(half):
            freq = 10000.0 ** (-i / (half - 1))
            assert emb[row, i].item() == pytest.approx(math.sin(step * freq), abs=1e-4)
            assert emb[row, half + i].item() == pytest.approx(math.cos(step * freq), abs=1e-4)


@pytest.mark.slow
def test_output_depends_on_timestep_and_not_on_batch_neighbours():
    model = tiny()
    x = input_for(model, batch=1).expand(4, -1, -1, -1)
    n = torch.tensor([1, 2, 500, 1000])
    with torch.no_grad():
        eps = model(x, n)
        alone = model(x[2:3], n[2:3])
        scalar_n = model(x[:2], torch.tensor(500))
    for i in range(4):
        for j in range(i + 1, 4):
            assert (eps[i] - eps[j]).abs().max() > 1e-3, (n[i], n[j])
    # GroupNorm is per sample: an image's ε̂ does not depend on what else is in the batch,
    # which per-image seeding in the sampler and the Γ job rely on.
    torch.testing.assert_close(alone, eps[2:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scalar_n[0], eps[2], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_dropout_active_in_train_mode_only():
    torch.manual_seed(2)
    model = randomize_silent_layers(build_model("tiny", dropout=0.3))
    x, n = input_for(model, batch=2), torch.tensor([10, 20])
    with torch.no_grad():
        model.train()
        a, b = model(x, n), model(x, n)
        model.eval()
        c, d = model(x, n), model(x, n)
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(c, d)


def test_rejects_bad_inputs_and_architectures():
    model = build_model("tiny")
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 3, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="timesteps"):
        model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(in_channels=1, resolution=8, ch=16, ch_mult=(1, 2), attn_resolutions=(16,))
    with pytest.raises(ValueError, match="divisible"):
        UNet(in_channels=1, resolution=28, ch=16, ch_mult=(1, 2, 2, 2), attn_resolutions=())


def test_tiny_model_learns_to_denoise_digits(one_thread):
    """Gradients reach every layer through the near-silent initial output layers: a few Adam
    steps on 8×8 digits move every parameter and cut the held-out ε-MSE well below the
    untrained value E‖ε‖²/d = 1."""
    from sklearn.datasets import load_digits

    data = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    abar = torch.tensor(make_schedule("linear", 1000).alphas_cumprod, dtype=torch.float32)
    torch.manual_seed(3)
    model = build_model("tiny")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(4)

    def loss_on(x0: torch.Tensor) -> torch.Tensor:
        n = torch.randint(1, 1001, (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[n][:, None, None, None]
        return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, n), eps)

    train, test = data[:1500], data[1500:]
    with torch.no_grad():
        before = loss_on(test).item()
    for _ in range(40):
        idx = torch.randint(0, len(train), (32,), generator=gen)
        opt.zero_grad()
        loss_on(train[idx]).backward()
        opt.step()
    with torch.no_grad():
        after = loss_on(test).item()
    assert before == pytest.approx(1.0, abs=0.1)
    assert after < 0.4 * before, (before, after)
    unchanged = [k for k, v in model.state_dict().items() if torch.equal(v, initial[k])]
    assert not unchanged


# ---------------------------------------------------------------------------- registry


def test_config_is_json_and_rebuilds_the_same_model():
    for name in ("tiny", "mnist"):
        model = build_model(name)
        config = json.loads(json.dumps(model.config))
        assert config == PRESETS[name]
        accepted = set(inspect.signature(UNet).parameters)
        assert set(config) - {"type"} == accepted
        rebuilt = build_model(config)
        assert rebuilt.config == model.config
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()}


def test_overrides_and_unknown_names():
    assert build_model("tiny", dropout=0.25).config["dropout"] == 0.25
    assert PRESETS["tiny"]["dropout"] == 0.0  # presets are not mutated by overrides
    with pytest.raises(ValueError) as err:
        build_model("cifar-10")
    assert all(name in str(err.value) for name in PRESETS)
    with pytest.raises(ValueError, match="valid types: .*unet"):
        build_model({"type": "transformer"})
    with pytest.raises(ValueError, match="valid types"):
        build_model({"ch": 16})
    with pytest.raises(ValueError, match="does not accept .*'width'.*valid keys"):
        build_model("tiny", width=3)


def test_register_model_type(monkeypatch):
    monkeypatch.setattr(registry, "MODEL_TYPES", dict(registry.MODEL_TYPES))

    class Linear(nn.Module):
        def __init__(self, dim: int = 2):
            super().__init__()
            self.config = {"type": "linear-test", "dim": dim}
            self.lin = nn.Linear(dim, dim)
            # float64 state (like the oracle's schedule) must survive checkpoints unnarrowed.
            self.register_buffer("abar", torch.linspace(1.0, 2e-9, dim, dtype=torch.float64))

    register_model_type("linear-test", Linear)
    register_model_type("linear-test", Linear)  # idempotent
    model = build_model({"type": "linear-test", "dim": 3})
    assert model.lin.in_features == 3
    with torch.no_grad():
        model.abar.copy_(torch.tensor([1.0, 1.0 / 3.0, 2.0e-9 / 7.0], dtype=torch.float64))
    loaded, _ = model_from_bytes(model_to_bytes(model))
    assert loaded.abar.dtype == torch.float64 and torch.equal(loaded.abar, model.abar)
    assert model_digest(loaded) == model_digest(model)
    with pytest.raises(ValueError, match="already registered"):
        register_model_type("unet", Linear)


# ---------------------------------------------------------------------------- io


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny(seed=5)
    meta = {"step": 1200, "ema": 0.9999, "data": {"name": "digits", "range": [-1, 1]}}
    path = tmp_path / "ckpt" / "model.safetensors"
    save_model(model, path, metadata=meta)
    assert sorted(os.listdir(path.parent)) == ["model.safetensors"]  # no temp files left

    loaded, loaded_meta = load_model(path)
    assert loaded_meta == meta
    assert loaded.config == model.config and not loaded.training
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    x, n = input_for(model, batch=3), torch.tensor([1, 40, 999])
    with torch.no_grad():
        assert torch.equal(loaded(x, n), model(x, n))
    assert model_digest(loaded) == model_digest(model)
    assert model_from_bytes(model_to_bytes(model, meta))[1] == meta


def test_checkpoint_is_plain_safetensors(tmp_path):
    """An independent reader (safetensors' own file API) sees float32 tensors and our config."""
    model = tiny(seed=6).to(torch.bfloat16)
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        names = sorted(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in names)
    assert names == sorted(model.state_dict())
    assert json.loads(header["adpm_dist.config"]) == model.config
    assert header["adpm_dist.format"] == "adpm-model/1"
    loaded, meta = load_model(path)
    assert meta == {}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.float()), name
    assert model_digest(loaded) == model_digest(model)


def test_digest_is_deterministic_and_sensitive():
    a, b = tiny(seed=7), tiny(seed=7)
    assert model_digest(a) == model_digest(b)
    assert len(model_digest(a)) == 64
    assert model_digest(a) != model_digest(tiny(seed=8))
    # One weight moved by one ulp.
    with torch.no_grad():
        w = b.conv_in.weight
        w[0, 0, 0, 0] = torch.nextafter(w[0, 0, 0, 0], torch.tensor(math.inf))
    assert model_digest(a) != model_digest(b)
    # Same weights, different architecture config (dropout does not change the weights).
    c = build_model("tiny", dropout=0.1)
    c.load_state_dict(a.state_dict())
    assert model_digest(c) != model_digest(a)


def test_wrapped_model_saves_the_inner_network():
    class Wrapper(nn.Module):  # the attribute layout of DDP / DeepSpeed engines
        def __init__(self, module: nn.Module):
            super().__init__()
            self.module = module

    model = tiny(seed=9)
    assert model_digest(Wrapper(model)) == model_digest(model)
    assert state_dict_fp32(Wrapper(model)).keys() == model.state_dict().keys()
    loaded, _ = model_from_bytes(model_to_bytes(Wrapper(model)))
    assert model_digest(loaded) == model_digest(model)


def _blob(meta: dict) -> bytes:
    return st_save({"w": torch.zeros(2)}, metadata=meta)


@pytest.mark.parametrize("case", ["empty", "garbage", "truncated", "no-metadata", "bad-json",
                                  "unknown-type", "wrong-weights", "wrong-format"])
def test_corrupt_checkpoints_raise_naming_the_source(case):
    good = model_to_bytes(tiny())
    config = json.dumps(PRESETS["mnist"])
    data = {
        "empty": b"",
        "garbage": np.random.default_rng(0).bytes(4096),
        "truncated": good[: len(good) // 2],
        "no-metadata": st_save({"w": torch.zeros(2)}),
        "bad-json": _blob({"adpm_dist.format": "adpm-model/1", "adpm_dist.config": "{oops",
                           "adpm_dist.metadata": "{}"}),
        "unknown-type": _blob({"adpm_dist.format": "adpm-model/1", "adpm_dist.metadata": "{}",
                               "adpm_dist.config": json.dumps({"type": "vit"})}),
        "wrong-weights": _blob({"adpm_dist.format": "adpm-model/1", "adpm_dist.metadata": "{}",
                                "adpm_dist.config": config}),
        "wrong-format": _blob({"adpm_dist.format": "pickle", "adpm_dist.metadata": "{}",
                               "adpm_dist.config": config}),
    }[case]
    with pytest.raises(ValueError, match="^s3://bucket/ckpt.safetensors: "):
        model_from_bytes(data, source="s3://bucket/ckpt.safetensors")


def test_load_model_error_names_the_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(model_to_bytes(tiny())[:-100])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_model(path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_model(tiny(seed=1), path)
    before = path.read_bytes()

    def disk_full(src, dst):  # a fault a local filesystem will not produce on demand
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_model(tiny(seed=2), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize("preset, dims", [
    ("tiny", "unet-ch16-res8-c1"), ("mnist", "unet-ch32-res28-c1"),
    ("cifar10", "unet-ch128-res32-c3"), ("celeba64", "unet-ch128-res64-c3"),
    ("imagenet64", "unet-ch128-res64-c3"),
])
def test_every_preset_has_a_descriptive_name(preset, dims):
    assert registry.model_name(PRESETS[preset]) == f"{preset}:{dims}"
    assert registry.model_name(build_model(preset).config) == f"{preset}:{dims}"
    assert registry.model_name(PRESETS[preset], step=240) == f"{preset}:{dims}@step240"


def test_name_shows_what_sets_two_architectures_apart():
    base = registry.resolve_config("tiny")
    names = [registry.model_name(registry.resolve_config("tiny", **o)) for o in (
        {}, {"ch": 8}, {"resolution": 16}, {"in_channels": 3, "out_channels": 3},
        {"ch_mult": [1, 2, 2]}, {"num_res_blocks": 2}, {"pad_to": 16})]
    assert len(set(names)) == 7, names
    assert names[1] == "tiny+ch=8:unet-ch8-res8-c1"
    assert names[4] == "tiny+ch_mult=[1,2,2]:unet-ch16-res8-c1"
    far = registry.resolve_config("tiny", ch=8, ch_mult=[1], num_res_blocks=3, dropout=0.3)
    assert registry.model_name(far) == "unet-ch8-res8-c1"  # no preset is close: dims only
    assert registry.model_name({"type": "gaussian-mixture", "means": [[0.0]]}) == "gaussian-mixture"
    diff = registry.config_differences(base, registry.resolve_config("tiny", ch=8, dropout=0.1))
    assert diff == "ch 16 → 8, dropout 0.0 → 0.1"


def test_a_loaded_checkpoint_is_named_by_architecture_and_step(tmp_path):
    from adpm_dist.models.loading import load_checkpoint

    sched = {"name": "linear", "num_timesteps": 1000}
    save_model(build_model("tiny"), tmp_path / "a.safetensors", {"schedule": sched, "step": 7})
    save_model(build_model("tiny", ch=8), tmp_path / "b.safetensors", {"schedule": sched})
    assert load_checkpoint(str(tmp_path / "a.safetensors")).name == "tiny:unet-ch16-res8-c1@step7"
    assert load_checkpoint(str(tmp_path / "b.safetensors")).name == "tiny+ch=8:unet-ch8-res8-c1"


def test_gamma_mismatch_names_two_different_models(tmp_path):
    """The Γ file's model check (gamma.py) names both models: the names now differ."""
    from adpm_dist import gamma
    from adpm_dist.models.loading import load_checkpoint

    sched = {"name": "linear", "num_timesteps": 1000}
    save_model(build_model("tiny"), tmp_path / "a.safetensors", {"schedule": sched, "step": 5})
    save_model(build_model("tiny"), tmp_path / "b.safetensors", {"schedule": sched, "step": 9})
    a, b = (load_checkpoint(str(tmp_path / f"{k}.safetensors")) for k in "ab")
    c = load_checkpoint(str(tmp_path / "a.safetensors"))
    gf = gamma.GammaFile.empty(a.schedule, a.describe(), {})
    with pytest.raises(gamma.GammaFileError) as err:
        gamma.check_model(gf, b.digest, b.name)
    assert "'tiny:unet-ch16-res8-c1@step5'" in str(err.value)
    assert "'tiny:unet-ch16-res8-c1@step9'" in str(err.value)
    gamma.check_model(gf, c.digest, c.name)  # the same file: no error
