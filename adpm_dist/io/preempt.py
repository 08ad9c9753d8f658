"""Preemption: SIGUSR1 / SIGTERM set a flag; the training loop checkpoints and exits.

SLURM sends SIGUSR1 ahead of a time limit (``--signal=USR1@120``) and SIGTERM
on preemption. A signal handler must not touch torch.distributed or storage,
so it only records that a signal came. The loop polls ``requested()`` once per
step, agrees across ranks (any rank signalled ⇒ all stop after the same step),
finishes the step in flight, writes a checkpoint and returns
``REQUEUE_EXIT_CODE``.

``REQUEUE_EXIT_CODE`` (75, ``EX_TEMPFAIL`` in sysexits.h: "temporary failure,
the user is invited to retry") means: the state is safely checkpointed and the
job should be requeued; rerunning the same command resumes from ``latest.json``.
The launcher imports it from here.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable

REQUEUE_EXIT_CODE = 75
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_event = threading.Event()
_received: list[int] = []


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal API
    _received.append(signum)
    _event.set()


class PreemptionHandler:
    """Install handlers for ``signals``; restore the previous ones on ``uninstall``.

    Used as a context manager around the training loop so that in-process
    callers (tests, launchers) get their own handlers back afterwards.
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signals)
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        clear()
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, _handler)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def requested() -> bool:
    """True once a preemption signal arrived in this process."""
    return _event.is_set()


def received() -> list[str]:
    """Names of the signals received so far (for the log line)."""
    return [signal.Signals(s).name for s in _received]


def request() -> None:
    """Ask for a checkpoint-and-requeue as if a signal had come (launchers, notebooks)."""
    _event.set()


def clear() -> None:
    _event.clear()
    _received.clear()
