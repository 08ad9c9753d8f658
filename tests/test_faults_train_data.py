"""Training on data that does not fit or breaks: one error line (exit 2) before any work for
shape mismatches and missing shards, and a checkpoint at the step reached when bad data stops
a run, so that the rerun continues from there.

Real shards written by tools/make_shards.py, broken the way tests/test_data_faults.py does it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adpm_dist.io import data, shards
from adpm_dist.train import loop as train
from adpm_dist.train.run_dir import read_metrics
from tests.tool_modules import load_tool

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]
make_shards = load_tool("make_shards")


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("mnist") / "shards"
    make_shards.main(["mnist", str(out), "--limit", "40", "--test-fraction", "0"])
    return str(out / "train-*.tar")


def _digits(folder: Path, *extra: str) -> str:
    make_shards.main(["digits", str(folder), "--limit", "60", "--test-fraction", "0",
                      "--shard-size", "20", *extra])
    return str(folder / "train-*.tar")


def _tiny(urls: str, run: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", f"data.urls=[{urls}]", f"train.run_dir={run}",
            "data.batch_size=4", "train.progress=false", *extra]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------- shapes, before any work


def test_tiny_preset_on_mnist_shards_is_one_line_before_training(mnist, tmp_path):
    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "adpm_dist.train", *_tiny(mnist, run)],
        cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu"),
        capture_output=True, text=True, timeout=180)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    line = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(line) == 1, res.stderr
    for part in (mnist, "28×28×1", "8×8×1", "'model.preset'='tiny'", "--resolution 8 --fit resize",
                 "'model.preset'=mnist"):
        assert part in line[0], part
    assert not (run / "latest.json").exists() and not (run / "ckpt").exists()


def test_more_channels_in_the_data_than_the_model_takes(tmp_path, capsys):
    rgb = _digits(tmp_path / "rgb", "--channels", "3")
    assert train.main(_tiny(rgb, tmp_path / "run")) == 2
    line = _one_line(capsys)
    for part in (rgb, "8×8×3", "8×8×1", "'data.channels'", "'model.options.in_channels'"):
        assert part in line, part


def test_data_resolution_that_the_shards_do_not_have(tmp_path, capsys):
    grey = _digits(tmp_path / "g")
    assert train.main(_tiny(grey, tmp_path / "run", "data.resolution=16")) == 2
    line = _one_line(capsys)
    for part in (grey, "'data.resolution'", "16", "8×8×1"):
        assert part in line, part


def test_explicit_channel_conversion_is_allowed(tmp_path):
    from adpm_dist.train.batches import check_data
    from adpm_dist.train.config import build_config

    rgb = _digits(tmp_path / "rgb", "--channels", "3")
    cfg = build_config(preset="tiny", overrides=[f"data.urls=[{rgb}]", "data.channels=1"])
    check_data(cfg, {"resolution": 8, "in_channels": 1})  # RGB → grey, as asked: no error
    cfg = build_config(preset="tiny", overrides=[f"data.urls=[{rgb}]", "data.channels=3"])
    with pytest.raises(train.ConfigError, match=r"'data.channels'.*in_channels"):
        check_data(cfg, {"resolution": 8, "in_channels": 1})


def test_missing_shards_say_how_to_make_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the preset's data/shards/digits is relative: not there
    assert train.main(["--preset", "tiny", f"train.run_dir={tmp_path / 'run'}"]) == 2
    line = _one_line(capsys)
    assert "data/shards/digits/train-*.tar" in line and "'data.urls'" in line
    assert "python tools/make_shards.py digits data/shards/digits" in line
    assert not (tmp_path / "run" / "ckpt").exists()


# ---------------------------------------------------------------- bad data stops a run


def _break(url: Path, how: str) -> None:
    """Every shard loses samples, so any shard epoch 0 reads has bad ones in it."""
    if how == "truncated":
        url.write_bytes(url.read_bytes()[: 3 * 2048 + 700])  # 3 samples, then a cut
        return
    samples = list(data._iter_tar_groups(str(url)))
    samples[3]["png"] = b"not a png"
    shards.write_shard(str(url), samples)


@pytest.mark.parametrize("how", ["undecodable", "truncated"])
def test_bad_data_checkpoints_the_step_reached_and_the_rerun_continues(tmp_path, capsys, caplog,
                                                                      how):
    urls = _digits(tmp_path / "d")
    good = {p: p.read_bytes() for p in (tmp_path / "d").glob("train-*.tar")}
    for shard in good:
        _break(shard, how)
    run = tmp_path / "run"
    # 5 batches of 4 per epoch read 28 samples: too few for the data layer's early stop, so
    # epoch 0 ends with its bad-sample count over the 1 % limit and the batch of step 6 never
    # comes. The last periodic checkpoint is step 3.
    args = _tiny(urls, run, "data.batches_per_epoch=5", "data.shuffle_buffer=8",
                 "train.ckpt_every=3", "train.total_steps=8", "train.log_every=1")
    assert train.main(args) == 2
    line = _one_line(capsys)
    assert "step 5" in line and "above the limit" in line and "/d/train-00000" in line
    assert ("truncated=" if how == "truncated" else "undecodable_image=") in line
    latest = json.loads((run / "latest.json").read_text())
    assert latest["step"] == 5
    assert (run / "ckpt" / "step_00000005" / "mp_rank_00_model_states.pt").exists()
    assert [m["step"] for m in read_metrics(str(run))] == [1, 2, 3, 4, 5]
    for shard, blob in good.items():  # the data is fixed; the same command resumes at step 5
        shard.write_bytes(blob)
    caplog.set_level(logging.INFO, logger="adpm_dist.train.loop")
    assert train.main(args) == 0
    assert "resumed at step 5 of 8" in caplog.text
    assert [m["step"] for m in read_metrics(str(run))] == list(range(1, 9))
    assert json.loads((run / "latest.json").read_text())["step"] == 8


def test_shards_of_two_formats_are_one_line(tmp_path, capsys):
    small = _digits(tmp_path / "a")
    big = _digits(tmp_path / "b", "--resolution", "12")
    assert train.main(_tiny(f"{small},{big}", tmp_path / "run")) == 2
    line = _one_line(capsys)
    assert "'data.urls'" in line and "mix image formats" in line
