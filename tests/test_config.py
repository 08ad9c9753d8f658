"""Config layering (preset < user YAML < overrides), key/type checking, round trip."""

from __future__ import annotations

import pytest
import yaml

from adpm_dist.train import config as C


def test_every_preset_loads_and_builds_its_schedule():
    from adpm_dist.diffusion.schedule import make_schedule
    from adpm_dist.models.registry import PRESETS as MODEL_PRESETS

    for name in C.PRESETS:
        cfg = C.build_config(preset=name)
        assert cfg.model.preset in MODEL_PRESETS, name
        make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
        assert cfg.data.urls, name


def test_paper_hyperparameters_of_cifar10_preset():
    cfg = C.build_config(preset="cifar10")
    # Ho et al. (2020): lr 2e-4, batch 128, warm-up 5000, clip 1, EMA 0.9999, flips, 800k.
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.optim.warmup_steps) == (2e-4, 128, 5000)
    assert (cfg.optim.grad_clip, cfg.train.ema_decay, cfg.data.hflip) == (1.0, 0.9999, True)
    assert cfg.train.total_steps == 800_000
    assert (cfg.diffusion.schedule, cfg.diffusion.num_timesteps) == ("linear", 1000)
    im = C.build_config(preset="imagenet64")
    assert (im.diffusion.schedule, im.diffusion.num_timesteps) == ("cosine", 4000)


def test_precedence_preset_then_user_yaml_then_overrides(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({
        "preset": "cifar10",
        "optim": {"lr": 1.0e-4},
        "train": {"total_steps": 10, "run_dir": "from_yaml"},
        "model": {"options": {"dropout": 0.2}},
    }))
    cfg = C.build_config(user, ["train.run_dir=s3://b/run", "model.options.ch=64",
                                "data.urls=[a.tar, b.tar]"])
    assert cfg.optim.lr == 1e-4  # user YAML beats the preset's 2e-4
    assert cfg.optim.warmup_steps == 5000  # untouched preset value survives
    assert cfg.train.total_steps == 10
    assert cfg.train.run_dir == "s3://b/run"  # override beats user YAML
    assert cfg.model.options == {"dropout": 0.2, "ch": 64}  # maps merge key by key
    assert cfg.data.urls == ["a.tar", "b.tar"]
    assert cfg.model.preset == "cifar10"


@pytest.mark.parametrize(
    "override, named, choice",
    [
        ("optim.lrr=1e-3", "optim.lrr", "lr"),
        ("trian.total_steps=3", "trian", "train"),
        ("train.ckpt_evry=5", "train.ckpt_evry", "ckpt_every"),
    ],
)
def test_unknown_key_names_key_and_choices(override, named, choice):
    with pytest.raises(C.ConfigError) as err:
        C.build_config(preset="tiny", overrides=[override])
    msg = str(err.value)
    assert f"'{named}'" in msg and "valid choices" in msg and choice in msg
    assert f"did you mean '{choice}'" in msg


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\ndata:\n  batchsize: 4\n")
    with pytest.raises(C.ConfigError) as err:
        C.build_config(bad)
    assert str(bad) in str(err.value) and "'data.batchsize'" in str(err.value)
    assert "batch_size" in str(err.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        # OmegaConf's type check, reported as one line naming the override and the key.
        ("train.total_steps=abc", "config key 'train.total_steps': Value 'abc' of type 'str' could not "
                                  "be converted to Integer"),
        ("train.total_steps=1.5", "config key 'train.total_steps': Value '1.5' of type 'float' could "
                                  "not be converted to Integer"),
        ("data.hflip=maybe", "config key 'data.hflip': Value 'maybe' is not a valid bool"),
        ("optim.lr=fast", "config key 'optim.lr': Value 'fast' of type 'str' could not be converted "
                          "to Float"),
        ("optim.betas=[0.9,x]", "config key 'optim.betas[1]': Value 'x'"),
        ("train.seed.x=1", "config key 'train.seed'"),
        # Our value checks after the merge.
        ("train.zero_stage=5", "config key 'train.zero_stage'=5 must be 0, 1, 2 or 3"),
        ("train.loss=huber", "config key 'train.loss'='huber' must be 'mse' or 'l1'"),
        ("train.precision=fp16", "config key 'train.precision'='fp16' must be"),
        ("optim.betas=[0.9]", "config key 'optim.betas'=[0.9] must be two numbers"),
        ("train", "override 'train' must look like section.key=value"),
        ("=3", "override '=3' must look like section.key=value"),
        ("data.urls=[a-{000..009}.tar]", "override 'data.urls=[a-{000..009}.tar]': the value is not "
                                         "valid YAML"),
    ],
)
def test_mistyped_values_are_rejected(override, fragment):
    with pytest.raises(C.ConfigError) as err:
        C.build_config(preset="tiny", overrides=[override])
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg, msg
    if "=" in override.lstrip("="):
        assert msg.startswith(f"override '{override}'") or "config key" in msg


def test_a_mistyped_value_in_a_yaml_names_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\ntrain:\n  total_steps: many\n")
    with pytest.raises(C.ConfigError) as err:
        C.build_config(bad)
    assert str(err.value).startswith(f"{bad}: config key 'train.total_steps': Value 'many'")


def test_interpolations_resolve_after_every_layer(tmp_path, monkeypatch):
    user = tmp_path / "user.yaml"
    user.write_text("preset: tiny\ntrain:\n  run_dir: ${oc.env:ADPM_TEST_SCRATCH}/runs/a\n"
                    "  stage_dir: ${train.run_dir}/stage\n")
    monkeypatch.setenv("ADPM_TEST_SCRATCH", "/scratch/me")
    cfg = C.build_config(user, ["train.run_dir=${oc.env:ADPM_TEST_SCRATCH}/runs/b"])
    # The override wins, and stage_dir follows the final run_dir (resolved after the last layer).
    assert (cfg.train.run_dir, cfg.train.stage_dir) == ("/scratch/me/runs/b", "/scratch/me/runs/b/stage")
    with pytest.raises(C.ConfigError, match="config key 'train.stage_dir': Interpolation key 'nope'"):
        C.build_config(user, ["train.stage_dir=${nope}"])


def test_one_url_is_a_list_of_one(tmp_path):
    user = tmp_path / "one.yaml"
    user.write_text("preset: tiny\ndata:\n  urls: shards/train-*.tar\n")
    assert C.build_config(user).data.urls == ["shards/train-*.tar"]
    assert C.build_config(preset="tiny", overrides=["data.urls=x.tar"]).data.urls == ["x.tar"]


def test_preset_key_in_a_user_yaml_and_its_errors(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("preset: mnist\ntrain:\n  seed: 5\n")
    cfg = C.build_config(user, ["optim.lr=1e-3"])
    mnist = yaml.safe_load(C.preset_path("mnist").read_text())
    assert (cfg.model.preset, cfg.train.seed, cfg.optim.lr) == ("mnist", 5, 1e-3)
    assert cfg.train.total_steps == mnist["train"]["total_steps"]  # from the preset
    with pytest.raises(C.ConfigError, match="<config.yaml>: 'preset' must be a name, got"):
        C.config_from_yaml("preset: [tiny]\n")
    with pytest.raises(C.ConfigError, match="override 'preset=...' is not allowed"):
        C.build_config(user, ["preset=tiny"])
    with pytest.raises(C.ConfigError, match="unknown preset 'mnst' \\(did you mean 'mnist'"):
        C.config_from_yaml("preset: mnst\n")


def test_yaml_float_without_dot_is_a_float():
    # YAML 1.1 reads 1e-4 as a string; the config accepts it as the float it means.
    cfg = C.build_config(preset="tiny", overrides=["optim.lr=1e-4", "optim.weight_decay=0"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.weight_decay, float)


def test_unknown_preset_lists_choices():
    with pytest.raises(C.ConfigError) as err:
        C.build_config(preset="cifar100")
    assert "cifar10" in str(err.value) and "tiny" in str(err.value)


def test_resolved_config_round_trips():
    cfg = C.build_config(preset="celeba64", overrides=["train.seed=7", "model.options.ch=32"])
    again = C.config_from_yaml(C.config_to_yaml(cfg))
    assert again == cfg


def test_missing_file_is_named(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        C.build_config(tmp_path / "nope.yaml")


def test_main_returns_2_and_names_the_bad_key(capsys):
    from adpm_dist.train import loop as train

    rc = train.main(["--config", str(C.preset_path("tiny")), "optim.weight_decy=0.1"])
    assert rc == train.CONFIG_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert "optim.weight_decy" in err and "weight_decay" in err


@pytest.mark.parametrize("override, key, shown", [
    ("data.batch_size=0", "data.batch_size", "=0 "),
    ("optim.lr=0", "optim.lr", "=0.0 "),
    ("optim.lr=-0.5", "optim.lr", "=-0.5 "),
    ("optim.lr=.inf", "optim.lr", "=inf "),
    ("optim.lr=.nan", "optim.lr", "=nan "),
    ("train.total_steps=-1", "train.total_steps", "=-1 "),
    ("data.num_workers=-1", "data.num_workers", "=-1 "),
    ("data.shuffle_buffer=0", "data.shuffle_buffer", "=0 "),
    ("data.resolution=0", "data.resolution", "=0 "),
    ("data.channels=2", "data.channels", "=2 "),
    ("data.max_bad_fraction=-0.1", "data.max_bad_fraction", "=-0.1 "),
    ("optim.eps=0", "optim.eps", "=0.0 "),
    ("optim.betas=[0.9,1.5]", "optim.betas", "=[0.9, 1.5] "),
    ("optim.weight_decay=.inf", "optim.weight_decay", "=inf "),
    ("optim.grad_clip=.nan", "optim.grad_clip", "=nan "),
    ("train.ema_decay=.nan", "train.ema_decay", "=nan "),
    ("train.sample_every=-1", "train.sample_every", "=-1 "),
    ("train.sample_count=0", "train.sample_count", "=0 "),
    ("train.sample_steps=0", "train.sample_steps", "=0 "),
    ("train.seed=-1", "train.seed", "=-1 "),
    ("diffusion.num_timesteps=0", "diffusion.num_timesteps", "=0 "),
    ("diffusion.num_timesteps=5000", "diffusion.num_timesteps", "=5000 "),
    ("diffusion.schedule=quadratic", "diffusion.schedule", "='quadratic' "),
    ("train.run_dir=", "train.run_dir", "='' "),
])
def test_bad_numbers_and_names_are_refused_naming_the_key(override, key, shown):
    with pytest.raises(C.ConfigError) as err:
        C.build_config(preset="tiny", overrides=[override])
    msg = str(err.value)
    assert f"config key '{key}'{shown}" in msg and "\n" not in msg, msg  # key and the value got


def test_every_preset_passes_the_value_checks():
    for name in C.PRESETS:
        C.build_config(preset=name).validate()


@pytest.mark.parametrize("override", ["data.batch_size=0", "optim.lr=-1", "train.total_steps=-5"])
def test_main_reports_a_bad_value_as_one_line_exit_2(override, capsys):
    from adpm_dist.train import loop as train

    assert train.main(["--preset", "tiny", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and override.split("=")[0] in err[0]


def test_help_says_what_each_flag_and_key_does_with_defaults():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-m", "adpm_dist.train", "--help"], cwd=str(root),
                         env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    for flag in ("--config", "--preset", "section.key=value"):
        assert flag in text
    for preset in C.PRESETS:
        assert preset in text
    # Every config key, with its built-in default.
    for section, values in C.Config().to_dict().items():
        for key in values:
            assert f"{section}.{key}=" in text, f"{section}.{key}"
    for shown in ("data.batch_size=128", "optim.lr=0.0002", "train.total_steps=1000",
                  "train.run_dir=runs/default", "data.urls=[]"):
        assert shown in text, shown
    for status in ("75", "3", "2"):
        assert f"{status} " in text
    assert "docs/train.md" in text and "make_shards.py" in text
