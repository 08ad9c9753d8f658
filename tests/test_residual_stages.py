"""Issue 15 end to end on the imperfect mixture oracle (ε̂ = 0.9·ε* + 0.05): the Γ job's
model-error moments feed plan's predicted NELBO, the residual methods in plan, sample and
evaluate nll, and the expected-cost DP; the prediction agrees with the measured NELBO."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from adpm_dist.gamma import GammaFile, read_gamma
from adpm_dist.stages import estimate, evaluate, plan, sample
from tests.test_estimate_oracle import _mixture_shards

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("residual")
    args = _mixture_shards(root, count=1200, num_timesteps=100, eps_scale=0.9, eps_offset=0.05)
    gamma = root / "gamma.json"
    assert estimate.main([*args, "--out", str(gamma), "--batch-size", "2048"]) == 0
    assert read_gamma(str(gamma)).has_moments()
    return {"root": root, "checkpoint": args[1], "data": args[3], "gamma": str(gamma)}


def plan_json(setup, capsys, *extra) -> dict:
    capsys.readouterr()
    assert plan.main(["--gamma", setup["gamma"], "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def nll(setup, out, *extra) -> dict:
    assert evaluate.main(["nll", "--checkpoint", setup["checkpoint"], "--gamma", setup["gamma"],
                          "--data", setup["data"], "--out", str(out), "--num-workers", "0", "--no-progress",
                          "--batch-size", "600", *extra]) == 0
    return json.loads((out / "nll.json").read_text())


@pytest.mark.parametrize("official", [False, True])
def test_predicted_nelbo_agrees_with_the_measured_one(setup, tmp_path, capsys, official):
    flags = ["--official"] if official else []
    methods = ("ddpm-beta", "ddpm-tilde", "analytic-ddpm", "residual-ddpm")
    doc = nll(setup, tmp_path / "nll", "--steps", "5,20", "--methods", ",".join(methods), *flags)
    assert doc["conventions"]["nll_clip_x0"] is official
    assert doc["conventions"]["decoder"] == ("official" if official else "exact")  # tanh Φ, 1e-12 floor
    assert doc["fingerprint"]["conventions"].get("decoder", "exact") == doc["conventions"]["decoder"]
    for k in (5, 20):
        for method in methods:
            got = plan_json(setup, capsys, "--steps", str(k), "--method", method, *flags)
            measured = doc["results"][f"even/K={k}/{method}"]
            gap = abs(got["predicted_nelbo_bpd"] - measured["bpd"])
            assert gap < 4 * math.hypot(got["predicted_nelbo_stderr"], measured["bpd_stderr"]), (k, method)
        # the KL-optimal variance is the better bound, measured with common random numbers too
        res = doc["results"]
        assert res[f"even/K={k}/residual-ddpm"]["bpd"] < res[f"even/K={k}/analytic-ddpm"]["bpd"]


def test_expected_cost_dp_minimises_the_predicted_nelbo(setup, capsys):
    for method in ("ddpm-beta", "analytic-ddpm", "residual-ddpm"):
        best = plan_json(setup, capsys, "--steps", "6", "--method", method, "--trajectory", "optimal")
        assert best["dp_cost"] == f"expected NELBO of {method}"
        for other in (["--trajectory", "even"], ["--trajectory", "optimal", "--dp-cost", "paper"],
                      ["--trajectory", "quadratic"]):
            alt = plan_json(setup, capsys, "--steps", "6", "--method", method, *other)
            assert best["predicted_nelbo_bpd"] <= alt["predicted_nelbo_bpd"] + 1e-12, (method, other)
    paper = plan_json(setup, capsys, "--steps", "6", "--trajectory", "optimal", "--official",
                      "--dp-cost", "paper")
    assert paper["dp_cost"] == "the paper's J(s, t)"
    official = plan_json(setup, capsys, "--steps", "6", "--trajectory", "optimal", "--official")
    assert official["dp_cost"].startswith("the official code's _dp_seg")


def test_residual_is_not_worse_than_analytic_in_prediction_at_every_k(setup, capsys):
    for k in (2, 3, 5, 10, 25, 50, 100):
        bits = {m: plan_json(setup, capsys, "--steps", str(k), "--method", m)["predicted_nelbo_bpd"]
                for m in ("analytic-ddpm", "residual-ddpm")}
        assert bits["residual-ddpm"] <= bits["analytic-ddpm"] + 1e-12, k


def test_nll_optimal_trajectory_is_each_methods_own(setup, tmp_path):
    doc = nll(setup, tmp_path / "opt", "--steps", "6", "--methods", "ddpm-beta,residual-ddpm",
              "--trajectory", "optimal")
    taus = doc["trajectories"]
    assert set(taus) == {"optimal/K=6/ddpm-beta", "optimal/K=6/residual-ddpm"}
    assert taus["optimal/K=6/ddpm-beta"] != taus["optimal/K=6/residual-ddpm"]
    assert doc["conventions"]["dp_cost"] == "auto"
    assert doc["fingerprint"]["conventions"]["dp_cost"] == "expected"


def test_sample_with_residual_methods_and_a_format_1_file_refused(setup, tmp_path, capsys):
    for method, extra in (("residual-ddpm", []), ("residual-ddim", ["--eta", "0.5"]),
                          ("residual-ddim", ["--ddim-direction", "network"])):
        out = tmp_path / f"{method}-{len(extra)}-{extra[-1] if extra else ''}"
        assert sample.main(["--checkpoint", setup["checkpoint"], "--gamma", setup["gamma"], "--method",
                            method, "--steps", "5", "--num-samples", "8", "--out", str(out),
                            "--no-progress", *extra]) == 0
        job = json.loads((out / "job.json").read_text())
        assert job["method"] == method
        assert ("ddim_direction" in job["conventions"]) == (method == "residual-ddim")
    old = read_gamma(setup["gamma"])
    v1 = GammaFile(schedule=old.schedule, model=old.model, sum=old.sum, sum_sq=old.sum_sq, count=old.count,
                   contributions=old.contributions)
    (tmp_path / "v1.json").write_text(v1.to_json())
    assert json.loads((tmp_path / "v1.json").read_text())["format"] == "adpm-gamma/1"
    capsys.readouterr()
    v1_args = ["--checkpoint", setup["checkpoint"], "--gamma", str(tmp_path / "v1.json"), "--steps", "5",
               "--num-samples", "8", "--no-progress"]
    assert sample.main([*v1_args, "--method", "residual-ddpm", "--out", str(tmp_path / "v1out")]) == 2
    err = capsys.readouterr().err
    assert "format-1" in err and "--method residual-ddpm" in err and err.count("\n") == 1
    # analytic methods still work with it
    assert sample.main([*v1_args, "--method", "analytic-ddpm", "--out", str(tmp_path / "v1a")]) == 0
    assert np.isfinite(read_gamma(str(tmp_path / "v1.json")).gamma).all()


def test_plot_moments_shows_the_imperfect_models_excess_error(setup, tmp_path, capsys):
    from tests.tool_modules import load_tool

    tool = load_tool("plot_moments")
    capsys.readouterr()
    assert tool.main([setup["gamma"], "-o", str(tmp_path / "m.png"), "--raw"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (tmp_path / "m.png").stat().st_size > 0
    # ε̂ = 0.9ε* + 0.05: its error differs from what Analytic-DPM assumes from its Γ at most t
    assert info["timesteps"] == 100 and info["A_above_by_2se"] + info["A_below_by_2se"] > 50
    old = read_gamma(setup["gamma"])
    v1 = GammaFile(schedule=old.schedule, model=old.model, sum=old.sum, sum_sq=old.sum_sq, count=old.count,
                   contributions=old.contributions)
    (tmp_path / "v1.json").write_text(v1.to_json())
    assert tool.main([str(tmp_path / "v1.json"), "-o", str(tmp_path / "x.png")]) == 2
    assert "format-1" in capsys.readouterr().err
