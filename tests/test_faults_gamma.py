"""Γ-job faults: subsets of a split, a job that evaluates nothing, every numeric flag checked,
--help, errors naming the flag that would accept them, and what identifies a finished job."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from adpm_dist.gamma import merge, read_gamma, write_gamma
from adpm_dist.stages import estimate
from tests.estimate_helpers import ROOT, tiny_job_inputs

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread_module")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_inputs(tmp_path_factory.mktemp("gfaults"))


def argv(setup, out, *extra, data=None):
    return ["--checkpoint", setup["model"], "--data", data or setup["data"], "--out", str(out),
            "--num-workers", "0", "--no-progress", "--precision", "fp64", *extra]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- item 1: subsets, nothing evaluated


def test_a_subset_whose_ids_do_not_start_at_0_is_evaluated(setup, tmp_path):
    """Shard 2 alone holds ids 40..59: every one is used (it used to give count 0, exit 0)."""
    folder = setup["folder"]
    whole, low, high = (tmp_path / f"{n}.json" for n in ("whole", "low", "high"))
    assert estimate.main(argv(setup, whole)) == 0
    assert estimate.main(argv(setup, low, data=f"{folder}/test-{{000000..000001}}.tar")) == 0
    assert estimate.main(argv(setup, high, data=f"{folder}/test-000002.tar")) == 0
    w, lo, hi = (read_gamma(str(p)) for p in (whole, low, high))
    assert set(hi.count.tolist()) == {20} and [c["samples"] for c in hi.contributions] == [[40, 60]]
    assert set(lo.count.tolist()) == {40} and [c["samples"] for c in lo.contributions] == [[0, 40]]
    # The same draws as the whole run: noise depends on (seed, sample id, t) only.
    np.testing.assert_array_equal(lo.count + hi.count, w.count)
    np.testing.assert_allclose(lo.sum + hi.sum, w.sum, rtol=1e-12)
    merged = merge([lo, hi], ["low.json", "high.json"])  # disjoint ids of one data set: fine
    np.testing.assert_allclose(merged.sum, w.sum, rtol=1e-12)


def test_extra_passes_over_a_subset_take_ids_beyond_the_whole_split(setup, tmp_path):
    """Pass p uses pair id i + p·S with S the SPLIT's size (60), not the subset's (40): a second
    pass over shards 0..1 must not reuse the pair ids of shard 2's first pass (ids 40..59)."""
    out = tmp_path / "g.json"
    data = f"{setup['folder']}/test-{{000000..000001}}.tar"
    assert estimate.main(argv(setup, out, "--samples-per-t", "50", "--timesteps", "1-3", data=data)) == 0
    gf = read_gamma(str(out), require_complete=False)
    assert gf.count[:3].tolist() == [50] * 3
    assert [c["samples"] for c in gf.contributions] == [[0, 40], [60, 70]]


def test_a_job_that_evaluates_nothing_fails_and_writes_nothing(setup, tmp_path, capsys):
    folder = tmp_path / "bad"
    shutil.copytree(setup["folder"], folder)
    shard = folder / "test-000002.tar"
    shard.write_bytes(shard.read_bytes()[:100])  # cut inside the first header: all 20 samples lost
    out = tmp_path / "g.json"
    data = f"{folder}/test-000002.tar"
    assert estimate.main(argv(setup, out, "--max-bad-fraction", "1", data=data)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert "test-000002.tar" in lines[0] and "nothing was evaluated" in lines[0]
    assert "20 samples" in lines[0] and "truncated=20" in lines[0] and "no Γ file written" in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------- item 5: every numeric flag


BAD_VALUES = [
    ("--samples-per-t", "0"), ("--samples-per-t", "x"), ("--batch-size", "0"), ("--batch-size", "-3"),
    ("--data-batch", "0"), ("--num-workers", "-1"), ("--flush-every", "0"), ("--target-stderr", "0"),
    ("--target-stderr", "-0.001"), ("--target-stderr", "nan"), ("--max-bad-fraction", "1.5"),
    ("--max-bad-fraction", "-0.1"), ("--max-bad-fraction", "inf"), ("--seed", "1.5"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_VALUES)
def test_each_bad_number_is_one_line_naming_the_flag_exit_2(flag, value, tmp_path, capsys):
    args = ["--checkpoint", str(tmp_path / "m"), "--data", str(tmp_path / "d"),
            "--out", str(tmp_path / "g.json"), f"{flag}={value}"]
    assert estimate.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and flag in err and value in err, err


@pytest.mark.parametrize("flag", ["--flush-every", "--batch-size"])
def test_flush_every_0_and_batch_size_0_end_at_once_on_the_real_cli(setup, tmp_path, flag):
    """--flush-every 0 used to spin forever; --batch-size 0 ended in a traceback."""
    cmd = [sys.executable, "-m", "adpm_dist.estimate", *argv(setup, tmp_path / "g.json"), flag, "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert error_lines(res.stderr) == [line for line in res.stderr.splitlines() if line.strip()]
    assert flag in res.stderr and ">= 1" in res.stderr


# ---------------------------------------------------------------- item 7: --help


def test_help_says_what_each_flag_does_its_default_and_units(capsys):
    parser = estimate.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = formatter._expand_help(action)
        assert len(text) >= 40, (action.option_strings, text)
        if not action.required and action.nargs != 0:  # a value with a default
            assert "default" in text, (action.option_strings, text)
    with pytest.raises(SystemExit) as info:
        estimate.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for phrase in ("(sample, t) pairs per forward pass", "data batches", "per rank", "standard error"):
        assert phrase in " ".join(out.split()), phrase


# ---------------------------------------------------------------- item 6: the flag that would accept it


def test_too_many_bad_samples_names_max_bad_fraction_and_that_value_works(setup, tmp_path, capsys):
    folder = tmp_path / "bad"
    shutil.copytree(setup["folder"], folder)
    shard = folder / "test-000001.tar"
    shard.write_bytes(shard.read_bytes()[:100])  # ids 20..39 lost
    out = tmp_path / "g.json"
    data = f"{folder}/test-{{000000..000002}}.tar"
    assert estimate.main(argv(setup, out, "--timesteps", "1-3", data=data)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "test-000001.tar" in line and "truncated=20" in line, line
    found = re.search(r"--max-bad-fraction=([0-9.]+) or more would skip", line)
    assert found, line
    args = argv(setup, out, "--timesteps", "1-3", "--max-bad-fraction", found.group(1), data=data)
    assert estimate.main(args) == 0
    gf = read_gamma(str(out), require_complete=False)
    assert gf.count[:3].tolist() == [40] * 3  # the 40 good samples


# ---------------------------------------------------------------- item 4: what identifies a job


def test_rerun_spelled_differently_or_with_other_settings_is_complete(setup, tmp_path, capsys,
                                                                     monkeypatch):
    """Settings that do not change the numbers (and relative vs absolute paths) are the same job;
    settings that do change them are refused."""
    out = tmp_path / "g.json"
    assert estimate.main(argv(setup, out, "--timesteps", "1-20")) == 0
    before = out.read_bytes()
    capsys.readouterr()
    monkeypatch.chdir(setup["base"])
    same = ["--checkpoint", "tiny.safetensors", "--data", "shards/test-{000000..000002}.tar",
            "--out", str(out), "--num-workers", "2", "--no-progress", "--precision", "fp64",
            "--timesteps", "all", "--batch-size", "8", "--data-batch", "3", "--flush-every", "2",
            "--max-bad-fraction", "0.5", "--run-id", "another-label"]
    assert estimate.main(same) == 0
    assert "already complete" in capsys.readouterr().out
    assert out.read_bytes() == before
    for flag, value in (("--seed", "3"), ("--samples-per-t", "30"), ("--timesteps", "1-19"),
                        ("--precision", "fp32"), ("--target-stderr", "0.5")):
        changed = [*same, flag, value]
        assert estimate.main(changed) == 2, flag
        err = capsys.readouterr().err
        assert "holds a different estimate" in err and flag.lstrip("-").replace("-", "_") in err, err
    assert out.read_bytes() == before


def legacy_fingerprint(gf, spec: str, world: int = 1, **over) -> dict:
    """The fingerprint as the code before this change wrote it (commit 665ce47)."""
    from adpm_dist.io import storage

    new = gf.extra["fingerprint"]
    data_key = storage.redact(json.dumps(spec))
    old = {"model": new["model"], "data": data_key, "seed": new["seed"],
           "samples_per_t": new["samples_per_t"], "timesteps": "all", "world_size": world,
           "num_workers": 0, "data_batch": 16, "run_id": "0123456789abcdef",
           "target_stderr": new["target_stderr"], "precision": new["precision"]}
    return {**old, **over}


def test_a_complete_file_with_an_old_fingerprint_is_still_complete(setup, tmp_path, capsys):
    out = tmp_path / "g.json"
    assert estimate.main(argv(setup, out)) == 0
    gf = read_gamma(str(out))
    gf.extra["fingerprint"] = legacy_fingerprint(gf, setup["data"])
    for c in gf.contributions:  # old contributions: run id, rank, world size, samples only
        for key in ("seed", "data", "timesteps"):
            c.pop(key)
        c["run_id"] = "0123456789abcdef"
    write_gamma(gf, str(out))
    before = out.read_bytes()
    capsys.readouterr()
    # Old files were drawn with noise stream 1 (issue 22): complete for --noise-stream 1 only.
    assert estimate.main(argv(setup, out, "--noise-stream", "1")) == 0
    assert "already complete" in capsys.readouterr().out and out.read_bytes() == before
    assert estimate.main(argv(setup, out)) == 2
    assert "noise_stream: 1 → 2" in capsys.readouterr().err and out.read_bytes() == before
    assert estimate.main(argv(setup, out, "--seed", "4", "--noise-stream", "1")) == 2
    assert "holds a different estimate" in capsys.readouterr().err
    # An old file over part of a split selected samples by another rule: not taken as this job.
    gf.extra["fingerprint"] = legacy_fingerprint(gf, f"{setup['folder']}/test-000002.tar")
    write_gamma(gf, str(out))
    part = f"{setup['folder']}/test-000002.tar"
    assert estimate.main(argv(setup, out, "--noise-stream", "1", data=part)) == 2
    assert "holds a different estimate" in capsys.readouterr().err


def test_unusable_shard_lists_are_one_line_exit_2(setup, tmp_path, capsys):
    """Shards of two splits, a shard listed twice, one the manifest lacks, a broken manifest:
    user errors naming the files (they used to end in a ValueError traceback)."""
    folder = setup["folder"]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "extra.tar").write_bytes((copy / "test-000000.tar").read_bytes())
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "manifest.json").write_text("{not json")
    for data, named in ((f"{folder}/test-000000.tar,{folder}/train-000000.tar", "'train'"),
                        (f"{folder}/test-000000.tar,{folder}/test-000000.tar", "listed twice"),
                        (f"{copy}/extra.tar", "extra.tar is not listed in"),
                        (f"{broken}/test-000000.tar", "is not valid JSON")):
        assert estimate.main(argv(setup, tmp_path / "g.json", data=data)) == 2, data
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and named in lines[0], lines
