"""The test hook of the failure protocol (:mod:`adpm_dist.io.collective`).

``ADPM_TEST_FAIL_RANK=R:K[:MODE]`` acts on rank R at round K (a number) or at the named
phase K (``write``, ``ckpt``, ``reduce``): it raises a RuntimeError, or with MODE ``user`` a
UserError, ``hang`` sleeps forever, ``kill`` sends the process SIGKILL. It first prints
``adpm-test: injected MODE on rank R at K t=EPOCH`` on stderr (tools/fault_table.py times
the exit from it). The faults it makes cannot all be produced for real in a test (as root an
unwritable output location does not exist; a real hang needs a real bug).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from adpm_dist.errors import UserError

FAIL_RANK_ENV = "ADPM_TEST_FAIL_RANK"


def injected_fault(rank: int, phase) -> None:
    """Act when ``ADPM_TEST_FAIL_RANK`` names this rank and phase (module doc)."""
    spec = os.environ.get(FAIL_RANK_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[:2] != [str(rank), str(phase)]:
        return
    mode = parts[2] if len(parts) > 2 else ""
    sys.stderr.write(f"adpm-test: injected {mode or 'exception'} on rank {rank} at {phase} "
                     f"t={time.time():.3f}\n")
    sys.stderr.flush()
    if mode == "hang":
        while True:
            time.sleep(3600)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "user":
        raise UserError(f"injected user error ({FAIL_RANK_ENV}={spec})")
    raise RuntimeError(f"injected failure ({FAIL_RANK_ENV}={spec})")
