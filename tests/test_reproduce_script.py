"""tools/reproduce_mnist.sh end to end at toy budgets: every stage runs, the report is
assembled from what the stages wrote, and a rerun of the finished script is a no-op.

The budgets are far too small to say anything about quality; docs/RESULTS.md has the
real runs. This test keeps `make demo` and the study script from rotting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "LIMIT": "300", "TEST_FRACTION": "0.1", "TRAIN_STEPS": "2", "BATCH": "8", "WARMUP": "1",
    "GAMMA_SAMPLES": "4", "NLL_STEPS": "2,5", "NLL_TRAJECTORIES": "even,optimal", "NLL_BATCH": "30",
    "SAMPLE_STEPS": "3", "NUM_SAMPLES": "6", "FID_STEPS": "2", "FID_METHODS": "ddim,analytic-ddpm",
    "FID_SAMPLES": "8", "GAMMA_TIMESTEPS": "all",
}


def run_script(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "tools" / "reproduce_mnist.sh"), "--profile", "study", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **SMALL, **env},
    )


@pytest.mark.timeout(900)
def test_study_script_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "study"
    res = run_script(out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    nll = json.loads((out / "nll" / "nll.json").read_text())
    assert nll["num_images"] == 30  # 10% of the first 300 digits
    assert set(nll["results"]) == {f"{t}/K={k}/{m}" for t in ("even", "optimal") for k in (2, 5)
                                   for m in ("ddpm-tilde", "ddpm-beta", "analytic-ddpm", "residual-ddpm")}
    for key in ("ddim-K2", "analytic-ddpm-K2"):
        fid = json.loads((out / "fid" / key / "fid.json").read_text())
        assert fid["num_samples"] == 8 and fid["fid"] > 0
    for method in ("analytic-ddim", "ddim"):
        assert (out / "samples" / f"{method}-K3" / "grid.png").stat().st_size > 0

    report = (out / "RESULTS.md").read_text()
    assert report == res.stdout[res.stdout.index("## Negative ELBO"):].rstrip("\n") + "\n"
    row = next(line for line in report.splitlines() if line.startswith("| optimal | analytic-ddpm |"))
    assert f"{nll['results']['optimal/K=5/analytic-ddpm']['bpd']:.3f}" in row
    assert "| analytic-ddpm | " in report.split("## FID")[1]
    assert "Γ: 1000 of 1000 timesteps, 4–4 samples each" in report
    stages = [json.loads(line)["stage"] for line in (out / "timings.jsonl").read_text().splitlines()]
    assert stages[:3] == ["shards", "train", "gamma"] and "fid ddim K=2" in stages

    # Everything is done: a rerun does no work and changes no result.
    stamp = (out / "nll" / "nll.json").stat().st_mtime_ns
    again = run_script(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stdout + again.stderr
    assert (out / "nll" / "nll.json").stat().st_mtime_ns == stamp


def test_bad_profile_is_refused(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "tools" / "reproduce_mnist.sh"), "--profile", "fast"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--profile must be 'study' or 'demo'" in res.stderr


def test_paper_section_puts_each_number_beside_the_papers(tmp_path):
    from tests.tool_modules import load_tool

    results_table = load_tool("results_table")
    (tmp_path / "nll").mkdir()
    bpd = {"even/K=10/ddpm-tilde": 70.0, "even/K=10/analytic-ddpm": 4.567,
           "optimal/K=10/ddpm-tilde": 3.21, "optimal/K=10/analytic-ddpm": 3.0}
    results = {key: {"bpd": value, "bpd_stderr": 0.1} for key, value in bpd.items()}
    (tmp_path / "nll" / "nll.json").write_text(json.dumps(
        {"results": results, "num_images": 5, "wall_time_s": 1.0, "world_size": 1}))
    for name, value in (("ddim-K10", 99.5), ("my-method-K25", 12.0)):
        (tmp_path / "fid" / name).mkdir(parents=True)
        (tmp_path / "fid" / name / "fid.json").write_text(json.dumps(
            {"fid": value, "num_samples": 8, "num_reference": 8}))
    assert results_table.main([str(tmp_path), "--paper"]) == 0
    report = (tmp_path / "RESULTS.md").read_text()
    side = report.split("## Beside the paper")[1]
    assert "| even analytic-ddpm | 4.57 / 5.47 |" in side  # Table 1, ET, K=10
    assert "| optimal ddpm-tilde | 3.21 / — |" in side  # the paper has no OT row for β̃
    assert "| ddim | 99.50 / 21.31 | — / 10.70 | — / 7.74 | — / 6.08 |" in side  # Table 2
    assert "| my-method | — / — | 12.00 / — |" in side
    assert side.index("| ddim |") < side.index("| my-method |")
    assert results_table.main([str(tmp_path)]) == 0
    assert "## Beside the paper" not in (tmp_path / "RESULTS.md").read_text()  # only on request
