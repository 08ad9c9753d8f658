"""The built wheel works on its own: presets, the SLURM helpers and the entry points are found
from a NON-editable install, run from a directory that is not the repository.

The wheel is built from a copy of the sources (the working tree is not written to) and
installed with --no-deps into a fresh virtual environment; the dependencies (torch, ...) are
borrowed from this interpreter's site-packages through a .pth line. Paths added that way do
not have their own .pth files processed, so the editable install of the checkout stays out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "adpm_dist", src / "adpm_dist",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(dist), str(src)], cwd=tmp)
    (wheel,) = dist.glob("adpm_dist-*.whl")
    return wheel


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
          str(wheel)], cwd=tmp)
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp).stdout.strip())
    (purelib / "zz_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


CHECK = textwrap.dedent("""
    import json, os, sys
    import adpm_dist
    from adpm_dist.launch import slurm
    from adpm_dist.train import config as C
    user = "user.yaml"
    with open(user, "w") as f:
        f.write("preset: tiny\\noptim:\\n  lr: 0.002\\n")
    cfg = C.build_config(user, ["train.total_steps=7"])
    sacct = slurm.SLURM_BIN / "sacct"
    presets = sorted(p.name for p in C.CONFIG_DIR.glob("*.yaml"))
    print(json.dumps({"file": adpm_dist.__file__, "presets": presets,
                      "model": cfg.model.preset, "lr": cfg.optim.lr, "steps": cfg.train.total_steps,
                      "sacct": str(sacct), "sacct_x": os.access(sacct, os.X_OK)}))
""")


def _write_gamma(path: Path) -> None:
    from adpm_dist.diffusion.schedule import make_schedule
    from adpm_dist.gamma import GammaFile

    sched = make_schedule("linear", 40)
    gf = GammaFile.empty(sched, {"digest": "d0", "name": "toy"})
    n = np.arange(1, sched.num_timesteps + 1)
    gf.add(n, 1 - 0.9 * np.exp(-n / 10))
    gf.contributions.append({"run_id": "t", "rank": 0, "world_size": 1, "samples": [0, 1]})
    path.write_text(gf.to_json())


@pytest.mark.timeout(900)
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    python = _fresh_venv(tmp_path, _build_wheel(tmp_path))
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = json.loads(_run([str(python), "-c", CHECK], cwd=work).stdout.strip().splitlines()[-1])
    site = python.parents[1]
    assert Path(out["file"]).is_relative_to(site), f"adpm_dist came from {out['file']}, not the wheel"
    assert out["presets"] == ["celeba64.yaml", "cifar10.yaml", "imagenet64.yaml", "mnist.yaml", "tiny.yaml"]
    assert (out["model"], out["lr"], out["steps"]) == ("tiny", 0.002, 7)
    assert Path(out["sacct"]).is_relative_to(site) and out["sacct_x"], out

    res = _run([str(python), "-m", "adpm_dist.train", "--help"], cwd=work)
    assert "--preset" in res.stdout
    _write_gamma(work / "g.json")
    res = _run([str(python), "-m", "adpm_dist.launch", "plan", "--gamma", "g.json", "--steps", "5",
                "--trajectory", "optimal", "--json"], cwd=work)
    plan = json.loads(res.stdout)
    assert plan["trajectory"][0] == 1 and plan["trajectory"][-1] == 40 and len(plan["trajectory"]) == 5
