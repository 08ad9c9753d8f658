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
import math
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


def raised_by_check(exc: BaseException, package: str) -> bool:
    """True when ``exc`` comes from an explicit ``raise`` of ``package``'s own code (its argument
    checks), not from a library call failing inside it (numpy's broadcasting error, torch's
    shape checks), nor from code outside ``package``.

    Only :class:`UserError` is a user error. A caller that knows a lower layer's argument
    came from the user translates that layer's argument checks, and nothing else, into a
    UserError: ``except ValueError as exc: if not raised_by_check(exc, "adpm_dist.diffusion"):
    raise``. Any other ValueError stays a bug (traceback, exit 1).
    """
    import linecache

    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    if module != package and not module.startswith(package + "."):
        return False
    return linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise ")


def print_error_line(message: object) -> None:
    """``error: MESSAGE`` on stderr in ONE write, newline included: ranks that fail together
    share a stderr pipe, and ``print`` (text, then newline) let their lines run into each other."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def report_user_error(exc: BaseException) -> int:
    """Print the one-line report of a user error; returns the exit status (2)."""
    print_error_line(exc)
    return EXIT_USER_ERROR


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``: user errors → one line + exit 2; anything else propagates (exit 1)."""
    try:
        return main(argv)
    except USER_ERRORS as exc:
        return report_user_error(exc)


# ----------------------------------------------------------------------------- flag types
# argparse ``type=`` callables: a value outside the range becomes argparse's
# "argument --flag: …" error, which UserArgumentParser turns into one line, exit 2.


def _number(kind: type, text: str):
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer flag that must be >= ``low`` (``int_at_least(1)``: a positive count)."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be >= {low}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float | None = None, high: float | None = None, *, low_open: bool = False
             ) -> Callable[[str], float]:
    """A finite float flag in [low, high] (``low_open``: (low, high]); None = unbounded."""
    def parse(text: str) -> float:
        value = _number(float, text)
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{value:g}: must be {'>' if low_open else '>='} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value:g}: must be <= {high:g}")
        return value
    parse.__name__ = "number"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
finite_float = float_in()
nonnegative_float = float_in(0.0)
positive_float = float_in(0.0, low_open=True)
fraction = float_in(0.0, 1.0)
