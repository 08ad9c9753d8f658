"""tools/gpu_check.sh stays runnable where no GPU is (issue 22 item 4): its CPU dry run of two
steps (the GPU tier, which collects and skips with its reason, and one benchmark) writes the one
summary, report.json, with every GPU test's outcome and the benchmark's JSON. The whole dry run
(every step, ~3 min here) is docs/benchmarks.md's to quote, not this test's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.estimate_helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240),
              pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU stand-in; "
                                 "on a GPU machine run tools/gpu_check.sh itself")]


def test_dry_run_writes_one_summary_with_the_tier_and_a_benchmark(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "GPU_CHECK_ONLY": "gpu_tier bench_trajectory"}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dry_run"] is True and report["gpu"] is None
    assert [(s["step"], s["rc"]) for s in report["steps"]] == [("gpu_tier", 0), ("bench_trajectory", 0)]
    tier = report["gpu_tier"]
    names = {t["test"].rsplit("::", 1)[-1].split("[")[0] for t in tier["tests"]}
    assert {"test_gamma_fp32_on_cuda_equals_the_cpu_fp64_reference",
            "test_world_size_invariance_with_two_ranks_sharing_the_gpu",
            "test_gamma_job_hot_loop_has_no_host_sync", "test_sampler_hot_loop_has_no_host_sync",
            "test_training_step_has_no_host_sync_but_its_agreement",
            "test_bf16_ema_equals_the_fp32_ema_of_the_master_weights",
            "test_fid_features_on_cuda_match_cpu"} <= names
    assert tier["counts"]["skipped"] == len(tier["tests"]) >= 14
    assert all("needs a CUDA device" in t["message"] for t in tier["tests"])
    bench = report["benchmarks"]["bench_trajectory"]
    assert bench["goal"] and all(r["same_cost"] for r in bench["results"])
    assert "DRY RUN" in (tmp_path / "out" / "report.md").read_text()
