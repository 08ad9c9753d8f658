"""One error policy for estimate, sample, evaluate and plan (issue 13).

A user error (bad flag, missing file) is ONE ``error:`` line and exit 2, with no
traceback; an internal error — even a ValueError — is never passed off as bad
input: it propagates from ``main()`` and a subprocess exits 1 with its traceback.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from adpm_dist.errors import UsageError
from adpm_dist.stages import estimate, evaluate, plan, sample
from tests.estimate_helpers import ROOT, tiny_model_data_gamma

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_model_data_gamma(tmp_path_factory.mktemp("cli"))


def commands(f, out) -> dict[str, tuple[list[str], list[str]]]:
    """CLI → (good argv, argv with a user error)."""
    est = ["--checkpoint", f["model"], "--data", f["data"], "--out", str(out / "g.json"),
           "--num-workers", "0", "--no-progress", "--timesteps", "1-4"]
    smp = ["--checkpoint", f["model"], "--method", "ddim", "--steps", "3", "--num-samples", "2",
           "--out", str(out / "s"), "--no-progress"]
    nll = ["nll", "--checkpoint", f["model"], "--data", f["data"], "--steps", "3", "--methods", "ddpm-beta",
           "--out", str(out / "n"), "--num-workers", "0", "--no-progress", "--limit", "4"]
    pln = ["--gamma", f["gamma"], "--steps", "4", "--json"]
    return {
        "adpm_dist.estimate": (est, [*est[:-1], "0-4"]),
        "adpm_dist.sample": (smp, [*smp, "--steps", "1"]),
        "adpm_dist.evaluate": (nll, [*nll, "--methods", "ddim"]),
        "adpm_dist.stages.plan": (pln, ["--gamma", str(out / "missing.json"), "--steps", "4"]),
    }


MAINS = {"adpm_dist.estimate": estimate, "adpm_dist.sample": sample, "adpm_dist.evaluate": evaluate,
         "adpm_dist.stages.plan": plan}
# Something each run calls: made to raise a plain ValueError, i.e. a bug, not bad input.
INSIDE = {"adpm_dist.estimate": "process_unit", "adpm_dist.sample": "draw_shard",
          "adpm_dist.evaluate": "negative_elbos", "adpm_dist.stages.plan": "load_for"}


def _run(args, code: str | None = None):
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=str(ROOT),
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("module", list(MAINS))
def test_user_errors_are_one_line_and_exit_2(files, tmp_path, module):
    _, bad = commands(files, tmp_path)[module]
    for argv in (bad, [*bad, "--no-such-flag"]):
        res = _run(["-m", module, *argv])
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, res.stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        assert "Traceback" not in res.stderr


@pytest.mark.parametrize("module", list(MAINS))
def test_internal_value_errors_propagate_in_process(files, tmp_path, module, monkeypatch):
    good, _ = commands(files, tmp_path)[module]

    def broken(*a, **k):
        raise ValueError("internal: not the user's fault")

    monkeypatch.setattr(MAINS[module], INSIDE[module], broken)
    with pytest.raises(ValueError, match="not the user's fault") as info:
        MAINS[module].main(good)
    assert not isinstance(info.value, UsageError)


@pytest.mark.parametrize("module", list(MAINS))
def test_internal_value_errors_exit_1_with_traceback(files, tmp_path, module):
    good, _ = commands(files, tmp_path)[module]
    code = (f"import sys, {MAINS[module].__name__} as m\n"
            f"def broken(*a, **k): raise ValueError('internal: not the user fault')\n"
            f"m.{INSIDE[module]} = broken\n"
            "sys.exit(m.main(sys.argv[1:]))\n")
    res = _run(good, code)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" in res.stderr and "ValueError: internal" in res.stderr
    assert "error: internal" not in res.stderr


@pytest.mark.slow
def test_the_good_commands_work(files, tmp_path):
    """The argv the tests above break are valid: each CLI succeeds on them unchanged."""
    for module, (good, _) in commands(files, tmp_path).items():
        assert MAINS[module].main(good) == 0, module
