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
                                   for m in ("ddpm-tilde", "ddpm-beta", "analytic-ddpm")}
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
