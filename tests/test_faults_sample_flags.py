"""Every numeric flag of sample, evaluate (nll, fid) and plan is checked when parsed, and the
--help of each says what a flag does, its default and unit, and which methods it applies to.

A bad value is ONE ``error:`` line naming the flag, exit 2, and nothing written: ``sample
--eta nan`` used to write black images with exit 0, ``--clip-pixel -3`` acted as +3, ``--eta``
with a DDPM-family method was ignored, ``evaluate nll --flush-every 0`` spun forever.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from adpm_dist.diffusion.analytic import DDPM_FAMILY
from adpm_dist.stages import evaluate, plan, sample
from tests.estimate_helpers import ROOT, tiny_model_data_gamma

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_model_data_gamma(tmp_path_factory.mktemp("flags"))


def sample_argv(f, out, *extra, method="ddim"):
    return ["--checkpoint", f["model"], "--method", method, "--steps", "3", "--num-samples", "2",
            "--out", str(out), "--no-progress", *extra]


def nll_argv(f, out, *extra):
    return ["nll", "--checkpoint", f["model"], "--data", f["data"], "--steps", "3", "--methods", "ddpm-beta",
            "--out", str(out), "--num-workers", "0", "--no-progress", "--limit", "4", *extra]


def fid_argv(f, out, *extra):
    return ["fid", "--samples", f["data"], "--reference", f["data"], "--out", str(out), "--no-progress",
            *extra]


def plan_argv(f, *extra):
    return ["--gamma", f["gamma"], "--steps", "4", "--json", *extra]


# (CLI, extra flags, what the one error line must contain)
BAD = [
    ("sample", ["--eta", "nan"], "--eta"),
    ("sample", ["--eta", "inf"], "--eta"),
    ("sample", ["--eta", "-0.5"], "--eta"),
    ("sample", ["--eta", "1.5"], "--eta"),
    ("sample", ["--clip-pixel", "-3"], "--clip-pixel"),
    ("sample", ["--clip-pixel", "0"], "--clip-pixel"),
    ("sample", ["--clip-pixel", "nan"], "--clip-pixel"),
    ("sample", ["--batch-size", "0"], "--batch-size"),
    ("sample", ["--num-samples", "0"], "--num-samples"),
    ("sample", ["--shard-size", "0"], "--shard-size"),
    ("sample", ["--steps", "1"], "--steps"),
    ("sample", ["--steps", "0"], "--steps"),
    ("sample", ["--steps", "2.5"], "--steps"),
    ("sample", ["--seed", "-1"], "--seed"),
    ("nll", ["--batch-size", "0"], "--batch-size"),
    ("nll", ["--num-workers", "-1"], "--num-workers"),
    ("nll", ["--flush-every", "0"], "--flush-every"),
    ("nll", ["--limit", "0"], "--limit"),
    ("nll", ["--seed", "-1"], "--seed"),
    ("nll", ["--steps", "0"], "--steps"),
    ("nll", ["--steps", "1,3"], "--steps"),
    ("nll", ["--steps", ","], "--steps"),
    ("nll", ["--methods", ","], "--methods"),
    ("nll", ["--trajectory", ","], "--trajectory"),
    ("fid", ["--batch-size", "0"], "--batch-size"),
    ("fid", ["--num-workers", "-1"], "--num-workers"),
    ("plan", ["--steps", "1"], "--steps"),
    ("plan", ["--eta", "nan"], "--eta"),
    ("plan", ["--eta", "2"], "--eta"),
    ("plan", ["--clip-pixel", "-3"], "--clip-pixel"),
    ("plan", ["--clip-pixel", "0"], "--clip-pixel"),
]


def run_main(cli: str, f, out, extra, method="ddim") -> int:
    if cli == "sample":
        return sample.main(sample_argv(f, out, *extra, method=method))
    if cli == "nll":
        return evaluate.main(nll_argv(f, out, *extra))
    if cli == "fid":
        return evaluate.main(fid_argv(f, out, *extra))
    return plan.main(plan_argv(f, *extra, "--method", method))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("cli", "extra", "flag"), BAD, ids=[f"{c}{' '.join(e)}" for c, e, _ in BAD])
def test_bad_numbers_are_one_line_exit_2_and_write_nothing(files, tmp_path, capsys, cli, extra, flag):
    out = tmp_path / "out"
    assert run_main(cli, files, out, extra) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], captured.err
    assert not out.exists()


@pytest.mark.parametrize("method", DDPM_FAMILY)
@pytest.mark.parametrize("cli", ["sample", "plan"])
def test_eta_with_a_ddpm_family_method_is_refused(files, tmp_path, capsys, cli, method):
    extra = ["--eta", "0.5"] + (["--gamma", files["gamma"]] if cli == "sample" else [])
    assert run_main(cli, files, tmp_path / "out", extra, method=method) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --eta 0.5: --method {method} has no η (it applies to ddim, analytic-ddim "
                   "and residual-ddim only); drop --eta")
    assert not (tmp_path / "out").exists()


def test_valid_edge_values_are_accepted(files, tmp_path, capsys):
    """η in [0, 1] with the DDIM family, --clip-pixel > 0, --eta 0 with any method."""
    for method, extra in (("ddim", ["--eta", "1"]),
                          ("analytic-ddim", ["--eta", "0.3", "--clip-pixel", "0.5"]),
                          ("analytic-ddpm", ["--eta", "0", "--clip-pixel", "2"])):
        assert plan.main(plan_argv(files, "--method", method, *extra)) == 0, capsys.readouterr().err
    assert sample.main(sample_argv(files, tmp_path / "s", "--eta", "1", "--clip-pixel", "0.5")) == 0


@pytest.mark.slow
def test_through_the_installed_entry_points(files, tmp_path):
    """The same one line and exit 2 from ``python -m`` (no traceback, nothing written)."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cases = [(["-m", "adpm_dist.sample", *sample_argv(files, tmp_path / "a", "--eta", "nan")], "--eta"),
             (["-m", "adpm_dist.evaluate", *nll_argv(files, tmp_path / "b", "--flush-every", "0")],
              "--flush-every"),
             (["-m", "adpm_dist.launch", "plan", *plan_argv(files, "--clip-pixel", "-3")], "--clip-pixel")]
    for args, flag in cases:
        res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                             cwd=str(ROOT), env=env)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and flag in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- --help


def _parsers():
    from adpm_dist.stages.evaluate_args import build_parser as evaluate_parser

    subs = next(a for a in evaluate_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {"sample": sample.build_parser(), "evaluate nll": subs.choices["nll"],
            "evaluate fid": subs.choices["fid"], "plan": plan.build_parser()}


@pytest.mark.parametrize("name", ["sample", "evaluate nll", "evaluate fid", "plan"])
def test_help_says_what_each_flag_does_and_its_default(name):
    parser = _parsers()[name]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        assert action.help and len(action.help) >= 12, f"{name} {flag}: no help text"
        if action.default not in (None, False) and not action.required:
            assert "%(default)s" in action.help or "default" in action.help.lower(), f"{name} {flag}"
        if action.type is not None and action.type not in (str,) and action.choices is None:
            # numbers say their range (a flag with choices lists them in the usage line)
            assert any(s in action.help for s in (">=", "<=", "> 0", "[0, 1]")), f"{name} {flag}: range"
    text = parser.format_help()
    assert "Default:" in text


def test_help_names_the_methods_each_flag_applies_to():
    p = _parsers()
    helps = {name: " ".join(a.help % {"default": a.default} for a in parser._actions)
             for name, parser in p.items()}
    for phrase in ("ddim, analytic-ddim, residual-ddim only", "analytic-ddpm / analytic-ddim", "pixel levels",
                   "its own seed SEED + i", "unit of resume", "needs --gamma"):
        assert phrase in helps["sample"], phrase
    nll_help = helps["evaluate nll"]
    assert "ddpm-beta, ddpm-tilde, analytic-ddpm" in nll_help and "not part of the result" in nll_help
    res = subprocess.run([sys.executable, "-m", "adpm_dist.sample", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=str(ROOT), env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and "--clip-pixel Y" in res.stdout
