"""What the launcher reports: exit statuses, outcomes and a live status line for a running job."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from adpm_dist.errors import UserError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class LaunchError(UserError, RuntimeError):
    """Launching could not start (no cluster, rejected submission, bad options): the user
    fixes it, so it is reported as one ``error:`` line with exit status 2."""


@dataclass
class Outcome:
    """How a launched run ended: the launcher's exit status and one message for the user."""

    status: int
    message: str


class StatusView:
    """One status line per change (logs, pipes) or a live panel on a terminal."""

    def __init__(self, title: str, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.title = title
        self.started = time.monotonic()
        self._last_plain = ""
        self._live = None
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.start()

    def update(self, state: str, detail: str = "", log_line: str = "", progress: str = "") -> None:
        """Show the state; ``progress`` (rank 0's latest ``progress:`` line) is shown with it,
        else, on a terminal, the log's last line."""
        elapsed = time.monotonic() - self.started
        if self._live is not None:
            from rich.console import Group
            from rich.text import Text

            head = Text.assemble((self.title, "bold"), "  ", (state, "cyan"),
                                 f"  {elapsed:5.0f}s  {detail}")
            tail = Text(progress or log_line, style="dim", no_wrap=True, overflow="ellipsis")
            self._live.update(Group(head, tail) if progress or log_line else head)
            return
        # A new line whenever the state or the progress line changes (off a terminal the
        # stage prints progress every ADPM_PROGRESS_INTERVAL seconds).
        plain = f"{self.title}: {state}" + (f" ({detail})" if detail else "")
        plain += f" — {progress}" if progress else ""
        if plain != self._last_plain:
            self.console.print(f"[{elapsed:5.0f}s] {plain}", highlight=False, soft_wrap=True)
            self._last_plain = plain

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()


def last_line(path: Path, max_bytes: int = 4096) -> str:
    """The last non-empty line of a log (progress bars redraw with \\r)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    parts = [s.strip() for s in tail.replace("\r", "\n").split("\n") if s.strip()]
    return parts[-1] if parts else ""


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
