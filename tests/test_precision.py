"""The numeric-mode policy (issue 16 item 2, issue 22 item 2), on CPU: every stage (the Γ job, the
NLL, sampling, FID) runs fp32 with TF32 off unless asked otherwise, records the mode it ran in
(``numeric_mode``: precision, dtype, autocast, TF32 switch, device), and a Γ file estimated in
another mode is accepted with one ``warning:`` line. bf16 autocast and the TF32 switches exist on CPU torch
too, so the recording and the switching are real here; what they do to Γ on a GPU is
tools/gpu_check.sh's to measure."""

from __future__ import annotations

import json

import pytest
import torch

from adpm_dist.gamma import read_gamma, write_gamma
from adpm_dist.models.loading import eps_function, mode_warning, numeric_mode, resolve_precision
from adpm_dist.stages import estimate, evaluate, sample
from tests.estimate_helpers import tiny_job_inputs

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread_module")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_inputs(tmp_path_factory.mktemp("precision"))


def gamma_argv(setup, out, *extra):
    return ["--checkpoint", setup["model"], "--data", setup["data"], "--out", str(out), "--num-workers", "0",
            "--no-progress", "--timesteps", "even:5", "--samples-per-t", "20", *extra]


def nll_argv(setup, gamma, out, *extra):
    return ["nll", "--checkpoint", setup["model"], "--gamma", str(gamma), "--data", setup["data"],
            "--steps", "5", "--methods", "analytic-ddpm", "--trajectory", "even", "--out", str(out),
            "--limit", "4", "--num-workers", "0", "--no-progress", *extra]


FP32_CPU = {"precision": "fp32", "dtype": "float32", "autocast": False, "tf32": False, "device": "cpu"}


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("statistics", [True, False])
def test_auto_is_fp32_with_tf32_off_for_every_stage_on_every_device(device, statistics):
    """One policy (issue 22): sampling's ``auto`` used to be bf16 on CUDA while Γ was fp32."""
    assert resolve_precision("auto", device, statistics) == "fp32"
    for mode in ("fp32", "tf32", "bf16", "fp64"):
        assert resolve_precision(mode, device, statistics) == mode


@pytest.mark.parametrize("mode, dtype, autocast, tf32", [
    ("fp32", "float32", False, False), ("tf32", "float32", False, True), ("bf16", "bfloat16", True, False),
    ("fp64", "float64", False, False)])
def test_numeric_mode_record(mode, dtype, autocast, tf32):
    assert numeric_mode(mode, torch.device("cuda", 1)) == {
        "precision": mode, "dtype": dtype, "autocast": autocast, "tf32": tf32, "device": "cuda"}


class FlagProbe(torch.nn.Module):
    """Records the TF32 switches and the autocast state while the network runs."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, x, n):
        self.seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                          torch.is_autocast_enabled("cpu")))
        return x * self.w


@pytest.mark.parametrize("precision, during", [
    ("fp32", (False, False, False)), ("auto", (False, False, False)), ("tf32", (True, True, False)),
    ("bf16", (False, False, True))])
@pytest.mark.parametrize("before", [False, True])
def test_tf32_switches_are_set_while_the_network_runs_and_restored(precision, during, before):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = before
    try:
        net = FlagProbe()
        eps = eps_function(net, torch.device("cpu"), precision, statistics=True)
        eps(torch.ones(2, 1), torch.ones(2, dtype=torch.long))
        assert net.seen == [during]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (before, before)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class FeatureProbe(FlagProbe):
    def forward(self, x):
        super().forward(x, None)
        return torch.zeros(x.shape[0], 2048)


@pytest.mark.parametrize("precision, during", [
    ("auto", (False, False, False)), ("fp32", (False, False, False)), ("tf32", (True, True, False)),
    ("bf16", (False, False, True))])
def test_fid_network_runs_in_an_explicit_mode_tf32_off_by_default(precision, during):
    """FID used to leave TF32 as PyTorch has it (cuDNN's on); now it is set while the net runs."""
    from adpm_dist.models.fid import InceptionFeatures

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        feats = InceptionFeatures("cpu", batch_size=2, precision=precision)
        feats.net = probe = FeatureProbe()
        assert feats(torch.zeros(3, 1, 8, 8)).shape == (3, 2048)
        assert probe.seen == [during, during]  # two chunks of ≤ 2 images
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_gamma_file_and_the_nll_record_the_mode_they_ran_in(setup, tmp_path, capsys):
    out = tmp_path / "g.json"
    assert estimate.main(gamma_argv(setup, out)) == 0  # default: auto
    extra = read_gamma(str(out), require_complete=False).extra
    assert extra["fingerprint"]["precision"] == "fp32"
    assert extra["numeric_mode"] == FP32_CPU
    assert evaluate.main(nll_argv(setup, out, tmp_path / "nll")) == 0
    doc = json.loads((tmp_path / "nll" / "nll.json").read_text())
    assert doc["numeric_mode"] == FP32_CPU
    assert doc["fingerprint"]["precision"] == "fp32"
    assert "warning:" not in capsys.readouterr().err


def test_a_gamma_file_from_another_mode_is_accepted_with_one_warning(setup, tmp_path, capsys):
    out = tmp_path / "g_bf16.json"
    assert estimate.main(gamma_argv(setup, out, "--precision", "bf16")) == 0
    assert read_gamma(str(out), require_complete=False).extra["numeric_mode"]["precision"] == "bf16"
    capsys.readouterr()
    assert evaluate.main(nll_argv(setup, out, tmp_path / "nll")) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert "--precision bf16" in warnings[0] and "uses fp32" in warnings[0] and out.name in warnings[0]


def sample_argv(setup, gamma, out, *extra):
    return ["--checkpoint", setup["model"], "--gamma", str(gamma), "--method", "analytic-ddpm",
            "--steps", "3", "--num-samples", "2", "--out", str(out), "--no-progress", *extra]


def test_sample_reports_an_explicit_mode_that_differs_from_gammas_and_not_auto(setup, tmp_path, capsys):
    """Only an explicit --precision other than Γ's is reported, once, and the run still succeeds."""
    out = tmp_path / "g.json"
    assert estimate.main(gamma_argv(setup, out)) == 0  # fp32
    capsys.readouterr()
    assert sample.main(sample_argv(setup, out, tmp_path / "s_bf16", "--precision", "bf16")) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert "--precision fp32" in warnings[0] and "uses bf16" in warnings[0]
    for precision, recorded in (("auto", FP32_CPU), ("fp64", numeric_mode("fp64", "cpu"))):
        argv = sample_argv(setup, out, tmp_path / f"s_{precision}", "--precision", precision)
        assert sample.main(argv) == 0
        assert "warning:" not in capsys.readouterr().err
        manifest = json.loads((tmp_path / f"s_{precision}" / "manifest.json").read_text())
        assert manifest["numeric_mode"] == recorded


def test_a_gamma_file_of_the_earlier_auto_counts_as_fp32(setup, tmp_path, capsys):
    """Files written before modes were resolved say "auto": every one was estimated on CPU, in
    fp32, so a rerun is still the same job and the NLL does not warn."""
    out = tmp_path / "g.json"
    assert estimate.main(gamma_argv(setup, out)) == 0
    gf = read_gamma(str(out), require_complete=False)
    gf.extra["fingerprint"]["precision"] = "auto"
    del gf.extra["numeric_mode"]
    write_gamma(gf, str(out))
    assert estimate.main(gamma_argv(setup, out, "--precision", "fp32")) == 0
    assert "already complete" in capsys.readouterr().out
    assert evaluate.main(nll_argv(setup, out, tmp_path / "nll")) == 0
    assert "warning:" not in capsys.readouterr().err


@pytest.mark.parametrize("recorded, wanted, warns", [
    ("fp32", "fp32", False), ("fp64", "fp32", False), ("auto", "fp32", False), (None, "bf16", False),
    ("bf16", "fp32", True), ("tf32", "fp64", True), ("fp32", "bf16", True)])
def test_mode_warning(recorded, wanted, warns):
    line = mode_warning(recorded, wanted, "--gamma g.json")
    assert (line is not None) == warns
    if warns:
        assert line.startswith("warning: --gamma g.json") and "\n" not in line
