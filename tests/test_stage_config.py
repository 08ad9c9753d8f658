"""``--config FILE`` and ``key=value`` for estimate, sample, evaluate nll|fid and plan
(adpm_dist/stages/config_args.py): precedence, unknown keys, the flags' own checks, and the
resolved configuration written next to each output without changing what a rerun recognises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from adpm_dist.errors import UsageError
from adpm_dist.stages import estimate, evaluate, plan, sample
from tests.estimate_helpers import tiny_model_data_gamma

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]

# Per stage: its parser (for evaluate, the subcommand), the required flags, and one checked
# integer option with its flag's default.
STAGES = {
    "estimate": (estimate.build_parser, [], {"checkpoint": "m", "data": "d", "out": "o"}, "batch_size", 256),
    "sample": (sample.build_parser, [], {"checkpoint": "m", "method": "ddim", "steps": 3,
                                         "num_samples": 2, "out": "o"}, "batch_size", 256),
    "nll": (evaluate.build_parser, ["nll"], {"checkpoint": "m", "data": "d", "steps": "3", "out": "o"},
            "batch_size", 128),
    "fid": (evaluate.build_parser, ["fid"], {"samples": "s", "reference": "r"}, "batch_size", 50),
    "plan": (plan.build_parser, [], {"gamma": "g.json", "steps": 3}, "eta", 0.0),
}


def _yaml(path: Path, entries: dict) -> str:
    path.write_text(yaml.safe_dump(entries))
    return str(path)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _value(stage: str, n: int):
    return n / 10 if stage == "plan" else n  # plan's option is η in [0, 1]


@pytest.mark.parametrize("stage", list(STAGES))
def test_precedence_defaults_then_config_then_overrides_then_flags(stage, tmp_path):
    build, sub, required, key, default = STAGES[stage]
    cfg = _yaml(tmp_path / "c.yaml", {**required, key: _value(stage, 3)})

    def parsed(*argv):
        return build().parse_args([*sub, *argv])

    flags = [t for k, v in required.items() for t in (_flag(k), str(v))]
    assert getattr(parsed(*flags), key) == default
    # The required flags themselves may come from the file.
    assert getattr(parsed("--config", cfg), key) == _value(stage, 3)
    assert getattr(parsed("--config", cfg, f"{key}={_value(stage, 5)}"), key) == _value(stage, 5)
    # An explicit flag wins over both, wherever it stands on the line.
    both = parsed(_flag(key), str(_value(stage, 7)), "--config", cfg, f"{key}={_value(stage, 5)}")
    assert getattr(both, key) == _value(stage, 7)
    assert both.resolved_config[key] == _value(stage, 7)
    first_key, first_value = next(iter(required.items()))
    assert both.resolved_config[first_key] == first_value  # from the file
    json.dumps(both.resolved_config)  # JSON-serialisable as it is recorded


@pytest.mark.parametrize("stage", list(STAGES))
def test_the_resolved_config_given_back_repeats_the_parse(stage, tmp_path):
    """What a stage records is enough to run it again: --config RESOLVED gives the same options."""
    build, sub, required, key, _ = STAGES[stage]
    flags = [t for k, v in required.items() for t in (_flag(k), str(v))]
    first = build().parse_args([*sub, *flags, _flag(key), str(_value(stage, 4)), "--no-progress"]
                               if stage != "plan" else [*sub, *flags, "--eta", "0.4", "--json"])
    again = build().parse_args([*sub, "--config", _yaml(tmp_path / "r.yaml", first.resolved_config)])
    assert again.resolved_config == first.resolved_config
    assert {k: getattr(again, k) for k in first.resolved_config} == first.resolved_config


def test_key_spellings_lists_switches_and_interpolation(tmp_path):
    cfg = _yaml(tmp_path / "nll.yaml", {"checkpoint": "runs/a", "data": "d", "out": "${checkpoint}/nll",
                                        "steps": [10, 25], "num-workers": 0, "per_image": True,
                                        "clip_x0": False, "nll_clip_x0": None})
    with pytest.raises(UsageError, match="'nll_clip_x0' sets nll_clip_x0 a second time"):
        evaluate.build_parser().parse_args(["nll", "--config", cfg])
    cfg = _yaml(tmp_path / "nll.yaml", {"checkpoint": "runs/a", "data": "d", "out": "${checkpoint}/nll",
                                        "steps": [10, 25], "num-workers": 0, "per_image": True,
                                        "clip_x0": False})
    args = evaluate.build_parser().parse_args(["nll", "--config", cfg, "methods=[ddpm-beta,analytic-ddpm]"])
    assert (args.command, args.out, args.steps, args.num_workers) == ("nll", "runs/a/nll", "10,25", 0)
    assert args.methods == "ddpm-beta,analytic-ddpm" and args.per_image is True
    assert args.nll_clip_x0 is False  # clip_x0: false is --no-clip-x0
    assert evaluate.build_parser().parse_args(["nll", "--config", cfg, "--clip-x0"]).nll_clip_x0 is True
    assert evaluate.build_parser().parse_args(["nll", "--config", cfg, "per_image=false"]).per_image is False
    # null keeps the flag's default
    cfg2 = _yaml(tmp_path / "s.yaml", {**STAGES["sample"][2], "clip_pixel": None, "seed": None})
    args = sample.build_parser().parse_args(["--config", cfg2])
    assert (args.clip_pixel, args.seed) == (None, 0)


@pytest.mark.parametrize("where", ["file", "override"])
@pytest.mark.parametrize("stage, typo, near", [
    ("estimate", "samples_per_tt", "samples_per_t"), ("sample", "num-sample", "num_samples"),
    ("nll", "methds", "methods"), ("fid", "referense", "reference"), ("plan", "trajectroy", "trajectory"),
])
def test_an_unknown_key_names_the_source_and_the_nearest_key(stage, typo, near, where, tmp_path, capsys):
    build, sub, required, _, _ = STAGES[stage]
    if where == "file":
        argv = [*sub, "--config", _yaml(tmp_path / "t.yaml", {**required, typo: 1})]
        source = f"--config {tmp_path / 't.yaml'}"
    else:
        argv = [*sub, "--config", _yaml(tmp_path / "t.yaml", required), f"{typo}=1"]
        source = f"override '{typo}=1'"
    with pytest.raises(UsageError) as err:
        build().parse_args(argv)
    assert f"{source}: unknown key '{typo}' (did you mean '{near}'?); valid keys: " in str(err.value)
    main = {"estimate": estimate, "sample": sample, "nll": evaluate, "fid": evaluate, "plan": plan}[stage]
    assert main.main(argv) == 2  # through the CLI: one line, exit 2, before any work
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"'{near}'" in lines[0]


@pytest.mark.parametrize("stage, key, bad", [
    ("sample", "batch_size", 0), ("sample", "method", "ddim2"), ("sample", "eta", 1.5),
    ("estimate", "max_bad_fraction", -0.1), ("estimate", "precision", "fp16"),
    ("nll", "num_workers", -1), ("fid", "batch_size", "many"), ("plan", "steps", 1),
])
def test_a_bad_value_fails_the_same_check_as_the_flag(stage, key, bad, tmp_path):
    """The independent truth is argparse's own error for the flag: the config's error ends with it."""
    build, sub, required, _, _ = STAGES[stage]
    flags = [t for k, v in required.items() if k != key for t in (_flag(k), str(v))]
    with pytest.raises(UsageError) as by_flag:
        build().parse_args([*sub, *flags, _flag(key), str(bad)])
    flag_reason = str(by_flag.value).split(f"argument {_flag(key)}: ")[1]
    for argv, source in (([*sub, "--config", _yaml(tmp_path / "b.yaml", {**required, key: bad})],
                          f"--config {tmp_path / 'b.yaml'}"),
                         ([*sub, *flags, f"{key}={bad}"], f"override '{key}={bad}'")):
        with pytest.raises(UsageError) as by_config:
            build().parse_args(argv)
        msg = str(by_config.value)
        assert f"{source}: key '{key}' ({_flag(key)}): " in msg, msg
        assert msg.split(f"({_flag(key)}): ")[1] == flag_reason, (msg, flag_reason)


def test_switches_and_mappings_are_refused_as_values(tmp_path):
    good = _yaml(tmp_path / "a.yaml", STAGES["sample"][2])
    with pytest.raises(UsageError, match="'no_progress' \\(--no-progress\\): a switch takes true or false"):
        sample.build_parser().parse_args(["--config", good, "no_progress=maybe"])
    with pytest.raises(UsageError, match="key 'seed' \\(--seed\\): expects a value or a list, not a dict"):
        sample.build_parser().parse_args(["--config", _yaml(tmp_path / "b.yaml", {**STAGES["sample"][2],
                                                                                "seed": {"a": 1}})])
    with pytest.raises(UsageError, match="the top level must be a mapping"):
        sample.build_parser().parse_args(["--config", _yaml(tmp_path / "c.yaml", [1, 2])])
    with pytest.raises(UsageError, match="nope.yaml: file not found"):
        sample.build_parser().parse_args(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(UsageError, match="unrecognized arguments: stray"):
        sample.build_parser().parse_args(["--config", good, "stray"])


# ---------------------------------------------------------------- the resolved config in each output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_model_data_gamma(tmp_path_factory.mktemp("stage-config"))


def _rerun_is_noop(main, argv: list[str], out: Path, capsys) -> None:
    before = out.read_bytes()
    capsys.readouterr()
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert out.read_bytes() == before  # nothing rewritten: the recorded config is the first run's


@pytest.mark.slow
def test_estimate_records_its_config_in_the_gamma_file(files, tmp_path, capsys):
    from adpm_dist.gamma import read_gamma

    out = tmp_path / "g.json"
    cfg = _yaml(tmp_path / "e.yaml", {"checkpoint": files["model"], "data": files["data"],
                                      "out": str(out), "timesteps": "1-4", "num_workers": 1})
    argv = ["--config", cfg, "batch_size=32", "--no-progress", "--num-workers", "0"]
    assert estimate.main(argv) == 0
    want = estimate.build_parser().parse_args(  # the same options given as flags only
        ["--checkpoint", files["model"], "--data", files["data"], "--out", str(out), "--timesteps", "1-4",
         "--batch-size", "32", "--num-workers", "0", "--no-progress"]).resolved_config
    assert read_gamma(str(out), require_complete=False).extra["config"] == want
    _rerun_is_noop(estimate.main, ["--config", cfg, "batch_size=32", "--num-workers", "2", "flush_every=3"],
                   out, capsys)


@pytest.mark.slow
def test_sample_records_its_config_beside_the_manifest(files, tmp_path, capsys):
    out = tmp_path / "s"
    cfg = _yaml(tmp_path / "s.yaml", {"checkpoint": files["model"], "method": "ddim", "steps": 3,
                                      "num_samples": 4, "out": str(out), "shard_size": 2})
    assert sample.main(["--config", cfg, "seed=5", "--no-progress"]) == 0
    want = sample.build_parser().parse_args(
        ["--checkpoint", files["model"], "--method", "ddim", "--steps", "3", "--num-samples", "4",
         "--out", str(out), "--shard-size", "2", "--seed", "5", "--no-progress"]).resolved_config
    assert json.loads((out / sample.CONFIG_NAME).read_text()) == want
    manifest = json.loads((out / "manifest.json").read_text())
    assert "config" not in manifest and manifest["job"]["seed"] == 5  # the job pins seed, not options
    _rerun_is_noop(sample.main, ["--config", cfg, "seed=5", "batch_size=1"], out / "manifest.json", capsys)


@pytest.mark.slow
def test_nll_records_its_config_in_nll_json(files, tmp_path, capsys):
    out = tmp_path / "n"
    cfg = _yaml(tmp_path / "n.yaml", {"checkpoint": files["model"], "data": files["data"], "steps": [3],
                                      "methods": ["ddpm-beta"], "out": str(out), "limit": 4})
    assert evaluate.main(["nll", "--config", cfg, "num_workers=0", "--no-progress"]) == 0
    want = evaluate.build_parser().parse_args(
        ["nll", "--checkpoint", files["model"], "--data", files["data"], "--steps", "3", "--methods",
         "ddpm-beta", "--out", str(out), "--limit", "4", "--num-workers", "0", "--no-progress"]
    ).resolved_config
    assert json.loads((out / "nll.json").read_text())["config"] == want
    _rerun_is_noop(evaluate.main, ["nll", "--config", cfg, "--num-workers", "1", "flush_every=2"],
                   out / "nll.json", capsys)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fid_records_its_config_in_its_result(files, tmp_path, capsys):
    samples = tmp_path / "s"
    assert sample.main(["--checkpoint", files["model"], "--method", "ddim", "--steps", "3",
                        "--num-samples", "4", "--out", str(samples), "--no-progress"]) == 0
    reference = files["data"]  # the 20 test digits
    out = tmp_path / "fid.json"
    cfg = _yaml(tmp_path / "f.yaml", {"samples": str(samples), "reference": reference, "out": str(out)})
    assert evaluate.main(["fid", "--config", cfg, "num_workers=0", "--no-progress", "--batch-size", "8"]) == 0
    want = evaluate.build_parser().parse_args(
        ["fid", "--samples", str(samples), "--reference", reference, "--out", str(out), "--num-workers", "0",
         "--no-progress", "--batch-size", "8"]).resolved_config
    assert json.loads(out.read_text())["config"] == want
    _rerun_is_noop(evaluate.main, ["fid", "--config", cfg, "--num-workers", "1", "batch_size=4"], out, capsys)
