"""The `plan` command: trajectory and σ² from a Γ file, table and JSON forms."""

import json

import numpy as np

from adpm_dist.diffusion.analytic import step_variances
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.diffusion.trajectory import optimal_trajectory
from adpm_dist.gamma import GammaFile
from adpm_dist.stages import plan


def write_gamma(path, schedule):
    gf = GammaFile.empty(schedule, {"digest": "d0", "name": "toy"})
    n = np.arange(1, schedule.num_timesteps + 1)
    for shift in (0.0, 0.01):
        gf.add(n, 1 - 0.95 * np.exp(-n / 30) - shift)
    gf.contributions.append({"run_id": "t", "rank": 0, "world_size": 1, "samples": [0, 2]})
    path.write_text(gf.to_json())
    return gf


def test_plan_json_matches_the_maths(tmp_path, capsys):
    sched = make_schedule("cosine", 200)
    gf = write_gamma(tmp_path / "g.json", sched)
    rc = plan.main(["--gamma", str(tmp_path / "g.json"), "--steps", "6", "--method", "analytic-ddpm",
                    "--trajectory", "optimal", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    tau = optimal_trajectory(sched, gf.gamma_vector(), 6)
    assert out["trajectory"] == tau.tolist()
    steps = out["steps"]
    assert [s["t"] for s in steps] == sorted((s["t"] for s in steps), reverse=True) and steps[0]["t"] == 200
    want = step_variances(sched, tau, "analytic-ddpm", gamma=gf.gamma_vector()).sigma2
    np.testing.assert_allclose([s["sigma2"] for s in steps], want, rtol=1e-15)


def test_plan_table_and_errors(tmp_path, capsys):
    write_gamma(tmp_path / "g.json", make_schedule("linear", 50))
    assert plan.main(["--gamma", str(tmp_path / "g.json"), "--steps", "4", "--method", "ddim"]) == 0
    assert "σ²" in capsys.readouterr().out
    assert plan.main(["--gamma", str(tmp_path / "g.json"), "--steps", "51"]) == 2
    assert "--steps 51: need 2 <= K <= N = 50" in capsys.readouterr().err
    assert plan.main(["--gamma", str(tmp_path / "missing.json"), "--steps", "4"]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_a_partial_gamma_file_serves_the_trajectories_it_covers(tmp_path, capsys):
    # A Γ job run with --timesteps only at the even K=6 trajectory: it must give
    # the σ² of the full file, and refuse trajectories it does not cover. Γ is
    # exact for x₀ ~ N(0, 0.25 I): Γ_t = β̄_t/(0.25 ᾱ_t + β̄_t), whose covariance
    # term is already non-decreasing, so the isotonic fit cannot tell the two apart.
    sched = make_schedule("linear", 200)
    exact = sched.bar_betas / (0.25 * sched.alphas_cumprod + sched.bar_betas)
    tau = np.array([1, 41, 81, 120, 160, 200])

    def gamma_file(ts, name):
        gf = GammaFile.empty(sched, {"digest": "d0", "name": "toy"})
        gf.add(ts, exact[ts])
        gf.contributions.append({"run_id": name, "rank": 0, "world_size": 1, "samples": [0, 1]})
        (tmp_path / f"{name}.json").write_text(gf.to_json())
        return gf

    full = gamma_file(np.arange(1, 201), "full")
    part = gamma_file(tau, "part")
    assert np.isnan(part.gamma_vector()[2]) and part.missing_timesteps().size == 200 - 6

    args = ["--steps", "6", "--method", "analytic-ddpm", "--trajectory", "even", "--json"]
    assert plan.main(["--gamma", str(tmp_path / "part.json"), *args]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["trajectory"] == tau.tolist()
    want = step_variances(sched, tau, "analytic-ddpm", gamma=full.gamma_vector()).sigma2
    np.testing.assert_allclose([s["sigma2"] for s in got["steps"]], want, rtol=1e-13)

    # K=7 even steps from timesteps the file lacks; the optimal DP needs all of them.
    assert plan.main(["--gamma", str(tmp_path / "part.json"), *args[:1], "7", *args[2:]]) == 2
    err = capsys.readouterr().err
    assert "Γ is missing at timesteps" in err and "34" in err and "--timesteps" in err
    assert plan.main(["--gamma", str(tmp_path / "part.json"), "--steps", "6", "--trajectory", "optimal"]) == 2
    assert "optimal trajectory needs Γ at every timestep" in capsys.readouterr().err
    # Methods that do not use Γ never look at it.
    assert plan.main(["--gamma", str(tmp_path / "part.json"), "--steps", "7", "--method", "ddim",
                      "--json"]) == 0
