"""Progress of long loops on rank 0: a rich bar on a terminal, plain lines everywhere else.

Off a terminal (SLURM, nohup, the launcher's logs, ``make demo`` piped to a file) a rich
bar would print only once, at the end. There, :func:`progress` prints instead, flushed, to
stdout::

    progress: <label> <done>/<total> (<pct>%) <rate>/s ETA <h:mm:ss>

(the launcher parses this line: keep the format). The first line comes
``min(interval, 5 s)`` after the start, then one every ``interval`` seconds
(env ``ADPM_PROGRESS_INTERVAL``, default 30; 0 = at every update), and a final line at the
end. Lines are printed from ``update`` calls, so a loop that stalls prints nothing new.
``rate`` counts only the work done since ``add_task`` (not work resumed from an earlier
run); a line needs some of that work done, or the task finished.

Both displays share rich's interface as the callers use it: context manager,
``add_task(label, total=, completed=)``, ``update(task, completed=, advance=, description=)``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

from adpm_dist.errors import UserError

INTERVAL_ENV = "ADPM_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0
FIRST_LINE_AFTER = 5.0  # seconds: a person sees the job move long before the first interval

_clock = time.monotonic  # module attribute so tests can drive the time


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass


@dataclass
class _Task:
    label: str
    total: int
    start: int  # completed when the task was added (resumed work: not in the rate)
    done: int
    t0: float
    last_line: float | None = None
    last_done: int | None = None


def _rate_text(rate: float) -> str:
    """Three significant digits, never in exponent form (the launcher reads a plain number)."""
    if rate <= 0 or not math.isfinite(rate):
        return "0"
    return f"{rate:.{max(0, 2 - math.floor(math.log10(rate)))}f}"


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class LineProgress:
    """``progress: …`` lines on a stream that is not a terminal (see the module docstring)."""

    def __init__(self, interval: float, stream=None):
        self.interval = interval
        self.stream = stream
        self.tasks: dict[int, _Task] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> bool:
        for task in self.tasks.values():
            self._line(task, _clock(), final=True)
        return False

    def add_task(self, description: str, total: float | None = None, completed: float = 0,
                 **_ignored) -> int:
        # One token per field: "Γ estimation (sample × t)" is labelled "Γ-estimation".
        label = "-".join(str(description).split("(")[0].split()) or "progress"
        task_id = len(self.tasks)
        done = int(completed)
        self.tasks[task_id] = _Task(label, int(total or 0), done, done, _clock())
        return task_id

    def update(self, task_id: int, completed: float | None = None, advance: float | None = None,
               total: float | None = None, **_ignored) -> None:
        """``description`` and other display-only arguments are accepted and ignored."""
        task = self.tasks[task_id]
        if total is not None:
            task.total = int(total)
        if completed is not None:
            task.done = int(completed)
        if advance is not None:
            task.done += int(advance)
        now = _clock()
        due = (task.t0 + min(self.interval, FIRST_LINE_AFTER) if task.last_line is None
               else task.last_line + self.interval)
        if now >= due:
            self._line(task, now)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _line(self, task: _Task, now: float, final: bool = False) -> None:
        worked = task.done - task.start
        finished = task.total > 0 and task.done >= task.total
        if (worked <= 0 and not finished) or (final and task.last_done == task.done):
            return
        elapsed = now - task.t0
        rate = worked / elapsed if worked > 0 and elapsed > 0 else 0.0
        left = max(task.total - task.done, 0)
        eta = left / rate if rate > 0 else 0.0
        pct = 100.0 * task.done / task.total if task.total else 100.0
        stream = self.stream or sys.stdout
        print(f"progress: {task.label} {task.done}/{task.total} ({pct:.1f}%) "
              f"{_rate_text(rate)}/s ETA {_hms(eta)}", file=stream, flush=True)
        task.last_line, task.last_done = now, task.done


def line_interval() -> float:
    """Seconds between lines, from ``ADPM_PROGRESS_INTERVAL`` (a user error names it)."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{INTERVAL_ENV}={text}: must be a number of seconds >= 0")
    return value


def progress(enabled: bool):
    """The display for one loop: rich bar on a terminal, lines off it, nothing if disabled."""
    if not enabled:
        return _NullProgress()
    if not sys.stdout.isatty():
        return LineProgress(line_interval())
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn())
