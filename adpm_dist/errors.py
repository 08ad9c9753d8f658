"""The user-error family, and the one policy every command line applies to errors.

A *user error* is something the person running the command can fix: a bad flag,
a missing or corrupt file, a Γ file for another model or schedule, refused
credentials. It is reported as ONE line naming the thing (``error: …``) and
exit status 2. Anything else is a bug or an environment failure (out of
memory, a lost rank, an NCCL error): it keeps its full traceback and exits 1,
so it never looks like a user mistake.

Every layer raises a subclass of :class:`UserError` for user errors; the
subclasses also derive from the builtin they used to be (ValueError, ...), so
``except ValueError`` in callers keeps working. ``FileNotFoundError`` and
``PermissionError`` from storage name the path and count as user errors too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input the user can fix; the message names the flag, file or key."""


class UsageError(UserError, ValueError):
    """A command-line flag or argument has a value the command cannot use."""


class UserArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags raise :class:`UsageError`, so :func:`run_cli` reports them as
    ONE ``error: …`` line with exit 2 (argparse would print its usage block and exit itself).
    ``--help`` is unchanged."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, PermissionError)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, USER_ERRORS)


def report_user_error(exc: BaseException) -> int:
    """Print the one-line report of a user error; returns the exit status (2)."""
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_USER_ERROR


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``: user errors → one line + exit 2; anything else propagates (exit 1)."""
    try:
        return main(argv)
    except USER_ERRORS as exc:
        return report_user_error(exc)
