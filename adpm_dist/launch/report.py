"""What the launcher reads back from the ranks' logs, the same way locally and on SLURM.

- :func:`latest_progress`: the newest ``progress: <label> <done>/<total> …`` line (the
  format of ``adpm_dist/train/progress.py``), relayed while the job runs;
- :func:`stage_summary`: the stage's own final line (a trailing JSON report, compacted),
  printed with the launcher's success line;
- :func:`key_line`: why a rank failed (the stage's ``error:`` line, else the exception
  line of its traceback);
- :func:`describe_failure`: which rank failed first. A rank killed by a signal is the
  root cause; peers that then failed (typically gloo/NCCL "connection closed") are named
  after it as consequences. The launcher exits 2 when the first failure was the stage's
  user error (exit status 2), else 1.
"""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from adpm_dist.launch.status import EXIT_FAILED, EXIT_USAGE

# Lines written by the launcher, submitit or SLURM, not by the stage.
NOISE = ("[launch]", "submitit ", "srun:", "slurmstepd", "threads per rank:", "progress:")
# torch.distributed prefixes the error output of each rank ("[rank0]: Traceback ...").
RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failed)\b.*:")
LONGEST = 300  # characters of a relayed line


def read_tail(path: Path, max_bytes: int = 65536) -> str:
    """The end of a log ('' when it does not exist yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _shorten(line: str) -> str:
    return line if len(line) <= LONGEST else line[:LONGEST - 1] + "…"


def _raw_lines(text: str) -> list[str]:
    """Lines with the rank prefix removed; progress bars redraw with \\r."""
    return [RANK_PREFIX.sub("", ln).rstrip() for ln in text.replace("\r", "\n").splitlines()]


def stage_lines(text: str) -> list[str]:
    """The stage's own non-empty lines: launcher, submitit and SLURM lines left out."""
    return [ln for ln in _raw_lines(text) if ln.strip() and not ln.lstrip().startswith(NOISE)]


def latest_progress(path: Path) -> str:
    """The newest ``progress:`` line of a log, or ''."""
    for line in reversed(_raw_lines(read_tail(path))):
        if line.startswith("progress: "):
            return _shorten(line.strip())
    return ""


def stage_summary(path: Path) -> str:
    """The stage's final line; a trailing multi-line JSON document becomes one line."""
    lines = stage_lines(read_tail(path))
    if not lines:
        return ""
    last = lines[-1].strip()
    if last in ("}", "]"):  # the end of an indented report: find where it starts
        for start in range(len(lines) - 1, max(-1, len(lines) - 500), -1):
            if lines[start].startswith(("{", "[")):
                try:
                    last = json.dumps(json.loads("\n".join(lines[start:])))
                except ValueError:
                    continue
                break
    return _shorten(last)


def key_line(text: str) -> str:
    """Why a rank failed: its last ``error:`` line, else its last exception line, else its last line."""
    lines = [ln.strip() for ln in stage_lines(text)]
    for wanted in (lambda ln: ln.startswith("error: "), EXCEPTION_LINE.match):
        found = [ln for ln in lines if wanted(ln)]
        if found:
            return _shorten(found[-1])
    return _shorten(lines[-1]) if lines else ""


@dataclass
class RankEnd:
    """How one rank (local rank or SLURM task) ended, and the line that says why."""

    rank: int
    status: int | None = None  # exit status, when it exited
    signal: int | None = None  # the signal that killed it
    why: str = ""

    def how(self) -> str:
        if self.signal:
            return f"was killed by signal {self.signal}"
        return f"exited with status {self.status}"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "?"


def first_failure(ends: list[RankEnd]) -> RankEnd:
    """The root cause among ``ends`` (in the order they were seen to fail).

    A rank killed by a signal (the OOM killer, kill -9, a node fault) is the cause: its
    peers then fail on the broken connection, sometimes before the launcher sees it die.
    """
    killed = [e for e in ends if e.signal]
    return killed[0] if killed else ends[0]


def describe_failure(ends: list[RankEnd], who: str, root_detail: str = "") -> tuple[int, str]:
    """(launcher exit status, message) for ranks that failed; ``ends`` in the order seen."""
    root = first_failure(ends)
    extra = f", {signal_name(root.signal)}" if root.signal else ""
    text = f"{who} {root.rank} {root.how()} (first to fail{extra})"
    text += f": {root.why}" if root.why else ""
    for end in [e for e in ends if e is not root][:3]:
        same = end.why == root.why and end.status == root.status
        text += f"; {who} {end.rank} then " + ("failed the same way" if same else
                                               f"failed: {end.why}" if end.why else end.how())
    if root_detail:
        text += f"\n{root_detail}"
    status = EXIT_USAGE if root.status == EXIT_USAGE and not root.signal else EXIT_FAILED
    return status, text
