"""Bad input in a data stream: counted by kind and by file, warned once per file, limited.

A truncated tar, an undecodable image, a wrong size or a missing field is skipped and
counted in a :class:`DataSummary` (mergeable across DataLoader workers and ranks); above
a configured fraction the stream stops with :class:`BadDataError`, whose message lists
the kinds and files.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

from adpm_dist.errors import UserError
from adpm_dist.io import storage

# Warnings go to the data layer's logger: that is the one users (and tests) configure.
log = logging.getLogger("adpm_dist.io.data")

BAD_KINDS = (
    "truncated",  # samples missing because the tar ended early or is corrupt
    "unreadable_shard",  # the shard could not be opened or read at all
    "undecodable_image",
    "wrong_size",
    "missing_field",
    "unexpected_sample",  # more samples in a shard than its manifest entry says
)


class BadDataError(UserError, RuntimeError):
    """Too much of the input was bad; the message lists kinds and files."""


@dataclass
class DataSummary:
    """Good/bad sample counts by kind and by file; mergeable across workers and ranks."""

    good: int = 0
    bad: Counter = field(default_factory=Counter)
    bad_files: dict[str, Counter] = field(default_factory=dict)

    @property
    def bad_total(self) -> int:
        return int(sum(self.bad.values()))

    @property
    def seen(self) -> int:
        return self.good + self.bad_total

    @property
    def bad_fraction(self) -> float:
        return self.bad_total / self.seen if self.seen else 0.0

    def add_bad(self, url: str, kind: str, n: int = 1) -> None:
        if n <= 0:
            return
        self.bad[kind] += n
        self.bad_files.setdefault(url, Counter())[kind] += n

    def merge(self, other: DataSummary | dict) -> None:
        if isinstance(other, dict):
            other = DataSummary.from_dict(other)
        self.good += other.good
        self.bad.update(other.bad)
        for url, kinds in other.bad_files.items():
            self.bad_files.setdefault(url, Counter()).update(kinds)

    def to_dict(self) -> dict:
        return {
            "good": self.good,
            "bad": dict(self.bad),
            "bad_files": {u: dict(k) for u, k in self.bad_files.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> DataSummary:
        return cls(
            good=int(d.get("good", 0)),
            bad=Counter(d.get("bad", {})),
            bad_files={u: Counter(k) for u, k in d.get("bad_files", {}).items()},
        )

    def report(self, max_files: int = 10) -> str:
        if not self.bad_total:
            return f"{self.good} samples, none bad"
        kinds = ", ".join(f"{k}={n}" for k, n in sorted(self.bad.items()))
        files = "; ".join(
            f"{url} ({', '.join(f'{k}={n}' for k, n in sorted(c.items()))})"
            for url, c in sorted(self.bad_files.items())[:max_files]
        )
        more = len(self.bad_files) - max_files
        tail = f"; … and {more} more files" if more > 0 else ""
        return (
            f"{self.good} good, {self.bad_total} bad samples "
            f"({100 * self.bad_fraction:.2f}%): {kinds}. Files: {files}{tail}"
        )

    def check(self, max_bad_fraction: float, *, min_seen: int = 0, setting: str | None = None) -> None:
        """Raise BadDataError if the bad fraction exceeds the limit (once ``min_seen`` seen).

        ``setting`` names what sets the limit (a flag or config key); the message then says
        which value of it would accept the bad fraction seen so far.
        """
        if self.seen and self.seen >= min_seen and self.bad_fraction > max_bad_fraction:
            limit, remedy = f"{100 * max_bad_fraction:.2f}%", self.remedy(setting)
            raise BadDataError(f"bad input above the limit of {limit}: {self.report()}; {remedy}")

    def remedy(self, setting: str | None) -> str:
        """What would let the stream go on: a value of ``setting`` (rounded up), or fixing the files."""
        needed = math.ceil(self.bad_fraction * 1000) / 1000
        if needed >= 1:
            return "every sample seen so far was bad: fix or replace the files named"
        if setting is None:
            return "fix or replace the files named (no setting of this command accepts bad samples)"
        return (f"{setting}={needed:g} or more would skip them and go on with the good samples "
                f"({needed:g}: the fraction bad so far; more may follow)")


class FileWarner:
    """Warn once per file per process (a resampled bad shard would otherwise spam logs)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, url: str, kind: str, detail: str) -> None:
        if url not in self._seen:
            self._seen.add(url)
            log.warning(
                "bad input in %s: %s (%s); skipping, counted in the summary",
                url,
                kind,
                storage.redact(detail),
            )
