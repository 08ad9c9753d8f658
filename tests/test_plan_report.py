"""Issue 23 item 3: ``plan --report DIR`` writes one page (markdown + PNG plots) that references its plots."""

from __future__ import annotations

import json
import re

from adpm_dist.gamma import loads
from adpm_dist.stages import plan
from adpm_dist.stages.plan_report import FILES
from tests.test_limit import oracle_and_gamma  # noqa: F401  (the module-scoped fixture)

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_writes_the_page_and_its_plots(oracle_and_gamma, tmp_path, capsys):  # noqa: F811
    _, path = oracle_and_gamma
    out = tmp_path / "report"
    assert plan.main(["--gamma", path, "--steps", "10", "--method", "residual-ddpm", "--trajectory",
                      "optimal", "--report", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["report"]["markdown"] == f"{out}/report.md"
    for name in FILES:
        assert (out / name).read_bytes()[:8] == PNG, name
    page = (out / "report.md").read_text()
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page) == list(FILES)  # every plot, by relative path
    assert "cross-fitted" in page and "likelihood limit (K = N, KL-optimal σ²)" in page
    for method in ("ddpm-beta", "ddpm-tilde", "analytic-ddpm", "residual-ddpm"):
        assert f"| 10 | optimal | {method} |" in page and f"| 50 | even | {method} |" in page
    assert "## Which method and K" in page and "- K = 60:" in page


def test_report_of_a_file_without_halves_says_its_predictions_are_in_sample(oracle_and_gamma, tmp_path,  # noqa: F811
                                                                          capsys):
    _, path = oracle_and_gamma
    gf = loads(open(path).read(), path)
    gf.half = None  # as a format-2 file
    old = tmp_path / "old.json"
    old.write_text(gf.to_json())
    assert plan.main(["--gamma", str(old), "--steps", "5", "--report", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.md").read_text()
    assert "predictions are in-sample" in page and "| 5 | even | analytic-ddpm |" in page
    assert "expected −ELBO" in capsys.readouterr().out
