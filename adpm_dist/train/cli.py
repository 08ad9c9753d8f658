"""The argument parser of the command lines at and above the train layer.

Its only difference from argparse's: a bad flag is a :class:`~adpm_dist.errors.UsageError`,
so :func:`~adpm_dist.errors.run_cli` reports it as ONE ``error: …`` line with exit 2
(argparse prints the usage block and exits by itself). ``--help`` is unchanged.
(It belongs next to ``run_cli`` in errors.py; it lives here until that move.)
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from adpm_dist.errors import UsageError


class UserArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")
