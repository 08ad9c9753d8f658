"""Progress a person can see off a terminal: `progress: …` lines on stdout at a steady
interval (ADPM_PROGRESS_INTERVAL), rich bars on a terminal, and training steps logged both ways.

Real processes: a pipe (as under SLURM, nohup and the launcher's logs) and a pseudo-terminal.
"""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adpm_dist.errors import UserError
from adpm_dist.train import progress as P

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

# The launcher parses this; it must not drift.
LINE = re.compile(r"^progress: (\S+) (\d+)/(\d+) \((\d+\.\d)%\) (\d+(?:\.\d+)?)/s ETA (\d+):(\d\d):(\d\d)$")

# A job that resumes at 20 of 100 and does 80 units, one every 20 ms.
SCRIPT = """
import time
from adpm_dist.train.progress import progress
with progress(True) as bar:
    task = bar.add_task("estimate", total=100, completed=20)
    for done in range(21, 101):
        time.sleep(0.02)
        bar.update(task, completed=done)
"""


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", **extra)


def _run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; everything it printed."""
    env = dict(env, TERM="xterm-256color", COLUMNS="100")
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, cwd=str(ROOT), env=env, stdout=follower, stderr=follower,
                            stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.1)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_off_a_terminal_lines_come_at_the_interval_with_the_exact_format():
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=str(ROOT), capture_output=True,
                         text=True, env=_env(ADPM_PROGRESS_INTERVAL="0.5"), timeout=120)
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines and all(LINE.match(line) for line in lines), lines
    parsed = [LINE.match(line).groups() for line in lines]
    assert all(label == "estimate" and total == "100" for label, _, total, *_ in parsed)
    done = [int(g[1]) for g in parsed]
    assert done == sorted(done) and done[-1] == 100  # the final line: the end state
    assert parsed[-1][1:4] == ("100", "100", "100.0")
    assert parsed[-1][5:] == ("0", "00", "00")  # nothing left: ETA 0:00:00
    # 80 units × 20 ms ≈ 1.6 s+: a line every 0.5 s is 2 to 6 lines, not one per update.
    assert 2 <= len(lines) <= wall / 0.5 + 2, lines
    assert done[0] < 60  # the first line comes soon after the start, not at the end
    # The rate counts only this run's work (80 units, not 100): below 80/1.6 s = 50/s.
    rate = float(parsed[-1][4])
    assert 20 < rate <= 50, lines
    assert "\x1b[" not in res.stdout and "━" not in res.stdout  # no terminal drawing in logs


def test_the_default_interval_is_30_seconds_first_line_after_5():
    # 80 × 20 ms ≈ 1.6 s: under the 5 s first line, so only the final line appears.
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=str(ROOT), capture_output=True,
                         text=True, env={k: v for k, v in _env().items()
                                         if k != "ADPM_PROGRESS_INTERVAL"}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1 and LINE.match(res.stdout.strip()), res.stdout
    assert res.stdout.startswith("progress: estimate 100/100 (100.0%) ")


def test_on_a_terminal_the_rich_bar_is_drawn_and_no_lines_are_printed():
    out = _run_in_pty([sys.executable, "-c", SCRIPT], _env(ADPM_PROGRESS_INTERVAL="0"))
    assert "━" in out and "100/100" in out
    assert "progress: " not in out


def test_rate_and_eta_from_a_clock(monkeypatch):
    """The numbers of one line, with a clock the test drives (no sleeping)."""
    now = [100.0]
    monkeypatch.setattr(P, "_clock", lambda: now[0])
    monkeypatch.setenv(P.INTERVAL_ENV, "10")
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    bar = P.progress(True)
    with bar:
        task = bar.add_task("train", total=1000, completed=400)
        now[0] += 4.0
        bar.update(task, completed=420, description="train loss 0.1")  # 4 s < 5 s: no line yet
        now[0] += 1.0
        bar.update(task, completed=425)  # 5 s: the first line
        now[0] += 9.0
        bar.update(task, completed=470)  # 9 s after it: no line
        now[0] += 1.0
        bar.update(task, completed=475)  # 10 s after it: a line
        now[0] += 3.0
        bar.update(task, completed=490)
    assert out.getvalue().splitlines() == [
        "progress: train 425/1000 (42.5%) 5.00/s ETA 0:01:55",
        "progress: train 475/1000 (47.5%) 5.00/s ETA 0:01:45",
        "progress: train 490/1000 (49.0%) 5.00/s ETA 0:01:42",  # the final line at exit
    ]


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(P.INTERVAL_ENV, value)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(UserError, match=f"{P.INTERVAL_ENV}={value}"):
        P.progress(True)


def test_disabled_progress_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv(P.INTERVAL_ENV, "0")
    with P.progress(False) as bar:
        task = bar.add_task("train", total=3)
        bar.update(task, completed=3)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- training logs steps


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    from tests.tool_modules import load_tool

    out = tmp_path_factory.mktemp("digits") / "shards"
    load_tool("make_shards").main(["digits", str(out), "--shard-size", "400", "--limit", "400"])
    return str(out / "train-*.tar")


def _train_argv(digits: str, run: Path) -> list[str]:
    return [sys.executable, "-m", "adpm_dist.train", "--preset", "tiny", f"data.urls=[{digits}]",
            f"train.run_dir={run}", "train.total_steps=6", "data.batch_size=4",
            "train.ckpt_every=3"]


def test_training_logs_step_lines_off_a_terminal(digits, tmp_path):
    res = subprocess.run(_train_argv(digits, tmp_path / "run"), cwd=str(ROOT), capture_output=True,
                         text=True, env=_env(ADPM_PROGRESS_INTERVAL="0"), timeout=150)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("progress: ")]
    assert [LINE.match(line).group(1, 2, 3) for line in lines] == [
        ("train", str(k), "6") for k in range(1, 7)]


def test_training_draws_the_bar_on_a_terminal(digits, tmp_path):
    out = _run_in_pty(_train_argv(digits, tmp_path / "run"), _env(ADPM_PROGRESS_INTERVAL="0"))
    assert "6/6" in out and "━" in out and "progress: " not in out


def test_a_stage_label_becomes_one_token(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setenv(P.INTERVAL_ENV, "0")
    with P.progress(True) as bar:
        task = bar.add_task("Γ estimation (sample × t)", total=4, completed=0)
        bar.update(task, completed=4)
    assert LINE.match(out.getvalue().strip()).group(1) == "Γ-estimation"
