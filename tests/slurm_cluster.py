"""pytest plugin: a real two-node SLURM cluster on loopback for the session.

Register with ``pytest_plugins = ["tests.slurm_cluster"]`` (or ``-p tests.slurm_cluster``).
The ``slurm_cluster`` fixture runs ``slurm/local-cluster.sh start`` (installing SLURM
and munge on a fresh Debian machine as root), points ``SLURM_CONF`` at its config
for the session, and runs ``stop`` at the end, unless the cluster was already up
before the session (then it is left running, as found).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "slurm" / "local-cluster.sh"
START_TIMEOUT_S = 600  # a fresh machine installs the Debian packages first


@dataclass(frozen=True)
class SlurmCluster:
    conf: Path  # the slurm.conf clients use (exported as SLURM_CONF)
    state: Path  # scratch folder: logs, spool, pidfiles
    nodes: tuple[str, ...] = ("n1", "n2")

    def run(self, *cmd: str, timeout: float = 60, check: bool = True
            ) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              check=check, env=dict(os.environ, SLURM_CONF=str(self.conf)))


def _script(action: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def slurm_cluster():
    state = Path(os.environ.get("ADPM_SLURM_STATE", ROOT / ".services" / "slurm"))
    env = dict(os.environ, ADPM_SLURM_STATE=str(state))
    was_up = _script("status", env, timeout=60).returncode == 0
    started = _script("start", env, timeout=START_TIMEOUT_S)
    if started.returncode != 0:
        pytest.fail(f"slurm/local-cluster.sh start failed (status {started.returncode}):\n"
                    f"{started.stdout}\n{started.stderr}", pytrace=False)
    conf = state / "slurm.conf"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield SlurmCluster(conf=conf, state=state)
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if not was_up:
            stopped = _script("stop", env, timeout=120)
            assert stopped.returncode == 0, stopped.stderr


# ---------------------------------------------------------------- helpers for launcher tests


def launch_env(**extra: str | None) -> dict[str, str]:
    """Environment for ``python -m adpm_dist.launch`` children: unbuffered, CPU, one thread;
    ``extra`` sets variables, or removes those given as None."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def run_launch(args: list[str], timeout: float, **env: str | None) -> subprocess.CompletedProcess:
    """``python -m adpm_dist.launch ARGS`` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "adpm_dist.launch", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=launch_env(**env))


def start_launch(args: list[str], log: Path, **env: str | None) -> subprocess.Popen:
    """The launcher in the background, stdout and stderr into ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "adpm_dist.launch", *args], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=launch_env(**env))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)


def submitted_job(log: Path) -> tuple[str, Path] | None:
    """(job id, rank-0 stdout log) once the launcher has printed them, else None."""
    text = log.read_text(errors="replace") if log.exists() else ""
    job = re.search(r"as SLURM job (\d+)", text)
    path = re.search(r"logs: (\S+_0_log\.out) \(rank 0\)", text)
    return (job.group(1), Path(path.group(1))) if job and path else None
