"""The ONE failure protocol of every distributed stage (training and the sharded-job core).

Three mechanisms, from the cheapest to the last resort:

1. **Phases** (:func:`together`, :func:`settle`): a rank that raises inside a phase still
   joins the phase's all-reduce with its failure flag set; the failing rank re-raises its
   own error and every other rank raises :class:`RankFailed` ("rank N failed: …"), with
   exit status 2 when the failure was a user error, else 1. Training folds the flags into
   the all-reduce its step does anyway (no extra collective per step).
2. **Failure report** (:func:`fail_fast`): a rank failing OUTSIDE a phase (in DeepSpeed,
   between two collectives) prints its error, writes a report to the rendezvous store
   (``adpm/<restarts>/abort``) and leaves with ``os._exit``. Its peers read the report
   wherever they wait (the watchdog polls it; a broken collective's handler looks) and
   leave with ``error: rank N failed: …`` and the same kind of exit status.
3. **Collective timeout** (the watchdog, :mod:`adpm_dist.io.watchdog`): each rank publishes
   ``2·round + waiting`` to the store about once a second (``hb/<rank>``; the main thread
   only bumps counters: :func:`arrive` before a round's collectives, :func:`progress` after
   them). When a rank has made no progress for longer than the timeout it names the ranks
   that did not arrive (the lowest heartbeat), reports it like a failure and exits 1.
   Timeout: ``--collective-timeout`` / ``train.collective_timeout`` /
   ``$ADPM_COLLECTIVE_TIMEOUT``; 0 or unset = auto: 600 s until 5 rounds are measured, then
   max(60 s, 20 × the median round time). Start-up (round 0) and :func:`slow` phases
   (checkpoints, sample grids, final writes) always allow at least 600 s.
4. **Liveness** (the watchdog): each rank's watchdog bumps ``alive/<rank>`` every poll; a peer
   whose counter stands still for 15 s (``$ADPM_LIVENESS_TIMEOUT``, timed on the watcher's own
   clock) is reported as ``rank N stopped responding (…)``, exit 1: a rank killed, stopped or
   lost with its node, even where no collective breaks (NCCL). Where a collective broke with
   no report, :func:`fail_fast` watches the counters up to 4 s more and names the rank that
   stopped (``rank N failed: it stopped responding (killed?) and the collective broke``);
   the store itself gone (rank 0 hosted it, no torchrun agent): rank 0 is named.

Test hook: ``ADPM_TEST_FAIL_RANK=R:K[:MODE]`` (:mod:`adpm_dist.io.fault_injection`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import numpy as np
import torch

from adpm_dist.errors import is_user_error, print_error_line
from adpm_dist.io import dist
from adpm_dist.io.fault_injection import FAIL_RANK_ENV, injected_fault  # noqa: F401 - re-exported
from adpm_dist.io.watchdog import (  # noqa: F401 - TIMEOUT_ENV, SLOW_TIMEOUT_S, timeout_from re-exported
    DONE,
    LEAVING,
    SLOW_TIMEOUT_S,
    TIMEOUT_ENV,
    RankFailed,
    Watchdog,
    agent_store,
    parse,
    report_line,
    timeout_from,
)

# ---------------------------------------------------------------- phases


def settle(err: BaseException | None, extra: Sequence[float] = ()) -> np.ndarray:
    """All-reduce (which ranks failed, *extra*); raise on every rank if any failed.

    Returns the summed ``extra``. Alone (no process group) it just re-raises ``err``.
    """
    if not dist.is_initialized():
        if err is not None:
            raise err
        return np.asarray(extra, dtype=np.float64)
    world, rank = dist.world_size(), dist.rank()
    packed = torch.zeros(world + len(extra), dtype=torch.float64)
    packed[world:] = torch.tensor(list(extra), dtype=torch.float64)
    if err is not None:
        packed[rank] = 1.0
    arrive()
    total = dist.all_reduce_sum(packed).numpy()
    progress()
    raise_failures(total[:world], err)
    return total[world:]


def raise_failures(flags, err: BaseException | None) -> None:
    """After an all-reduce of per-rank failure ``flags``: raise ``err`` on the failing rank,
    :class:`RankFailed` on the others (one all_gather_object of the reports)."""
    failed = np.flatnonzero(np.asarray(flags) > 0)
    if not failed.size:
        return
    report = None if err is None else (type(err).__name__, str(err), is_user_error(err))
    reports = dist.all_gather_object(report)
    if err is not None:
        raise err
    first = int(failed[0])
    raise RankFailed(first, *reports[first])


def together(fn: Callable[[], object], rank0_only: bool = False, share: bool = False):
    """Run ``fn`` on every rank (or on rank 0 only) as one phase; any failure ends every rank.

    With ``share`` the others receive rank 0's result (broadcast) instead of None. ``fn``
    must not run collectives itself (a rank failing before them would leave the others there).
    """
    result, err = None, None
    if not rank0_only or dist.rank() == 0:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the peers
            err = exc
    settle(err)
    return dist.broadcast_object(result) if share else result


# ---------------------------------------------------------------- watchdog and reports


_WATCH: Watchdog | None = None


def start(timeout: float | None = None) -> Watchdog | None:
    """Start this rank's watchdog once the process group exists (no-op for one process)."""
    global _WATCH
    if _WATCH is not None or not dist.is_initialized() or dist.world_size() < 2:
        return _WATCH
    info, limit = dist.env_info(), timeout_from(timeout)
    try:
        store = torch.distributed.TCPStore(info.master_addr, info.master_port, is_master=False,
                                           timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    except Exception as exc:  # noqa: BLE001 - the phases still work; say what is missing
        sys.stderr.write(f"warning: rank {dist.rank()}: no collective watchdog (rendezvous store at "
                         f"{info.master_addr}:{info.master_port}: {exc}); a hung rank is not named\n")
        return None
    restarts = (os.environ.get(k, "0") for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    prefix = "/".join(["adpm", *restarts])
    _WATCH = Watchdog(store, dist.rank(), dist.world_size(), limit, prefix)
    return _WATCH


def stop() -> None:
    """Watchdog off; the peers no longer judge this rank's liveness (it ends on its own)."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.finish()
        _WATCH = None


def shutdown() -> None:
    """The end of a SUCCESSFUL distributed run: watchdog off, then :func:`dist.shutdown`'s
    barrier (after a failure nobody calls this: :func:`run_protected` leaves at once)."""
    stop()
    dist.shutdown()


def arrive() -> None:
    """This rank has done its local work of the round and enters its collectives."""
    if _WATCH is not None:
        _WATCH.tick(waiting=True)


def progress() -> None:
    """The round's collectives completed."""
    if _WATCH is not None:
        _WATCH.tick(waiting=False)


@contextlib.contextmanager
def slow():
    """A phase that may take long on some ranks (checkpoint, grid, final write): ≥ 600 s."""
    if _WATCH is None:
        yield
        return
    _WATCH.slow_depth += 1
    try:
        yield
    finally:
        _WATCH.slow_depth -= 1


def peer_report(wait: float = 0.0) -> str | None:
    """Another rank's failure report in the store (its text), if any; ``wait``: seconds to wait
    for one (after a collective broke here: the failing rank writes it before it exits)."""
    if _WATCH is None:
        return None
    deadline = time.monotonic() + wait
    while True:
        try:
            text = _WATCH.report()
        except Exception:  # noqa: BLE001 - store gone
            return None
        if text is not None:
            return None if parse(text)[0] == _WATCH.rank else text
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def gone_peers(wait: float = 4.0, still: float = 3.0) -> list[int] | None:
    """After a collective broke with no report: the peers whose liveness counter did not move
    for ``still`` s while this rank's watchdog kept moving its own (watched up to ``wait`` s).
    None: cannot tell (no watchdog, or its store is gone) or a peer's report came meanwhile."""
    if _WATCH is None:
        return None
    start = time.monotonic()
    try:
        own = _WATCH.own_count()
        first = _WATCH.counters()
        while time.monotonic() - start < wait:
            time.sleep(0.25)
            if _WATCH.report() is not None:
                return None
            now = _WATCH.counters()
            moved = _WATCH.own_count() != own
            gone = [r for r, v in first.items() if v < DONE and now.get(r) == v]
            if time.monotonic() - start >= still and moved and gone:
                return gone
    except Exception:  # noqa: BLE001 - the store is gone
        if not agent_store():  # rank 0 hosted it: rank 0 is gone
            return [0] if _WATCH.rank != 0 else None
    return None


def _named_gone(exc: BaseException) -> tuple[str, int] | None:
    """A broken collective whose peer is gone: the line naming it (and a report for the others)."""
    gone = gone_peers()
    if not gone:
        return None
    names = ", ".join(map(str, gone))
    host = " (the rendezvous store's host)" if gone == [0] and not agent_store() else ""
    text = (f"{gone[0]}\tNoHeartbeat\t{'rank' if len(gone) == 1 else 'ranks'} {names}{host} failed: it "
            f"stopped responding (killed?) and the collective broke ({type(exc).__name__})\t0")
    with contextlib.suppress(Exception):
        text = _WATCH.claim(text)
        _WATCH.linger()  # rank 0 may host the store: let the peers read the report first
    return report_line(text, _WATCH.rank)


def fail_fast(exc: BaseException) -> int:
    """A failure escaped every phase: report it (peers read it from the store) and return
    the status to ``os._exit`` with. :class:`RankFailed` is reported as is (no report)."""
    if not LEAVING.acquire(blocking=False):
        time.sleep(3600)  # the watchdog is already ending this process
    if isinstance(exc, RankFailed):
        print_error_line(exc)
        time.sleep(1.0)  # let the failing rank end first: torchrun names the first as root cause
        return exc.status
    broken = isinstance(exc, getattr(torch.distributed, "DistError", ())) or any(
        s in str(exc) for s in ("gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe"))
    peer = peer_report(wait=2.0 if broken else 0.0)
    named = None if peer is not None or not broken else _named_gone(exc)
    if peer is not None or named is not None:  # our collective broke because a peer failed first
        line, status = named or report_line(peer, _WATCH.rank)
        sys.stderr.write(line + "\n")
        return status
    user = is_user_error(exc)
    if user:
        print_error_line(exc)
    else:
        traceback.print_exception(exc)
    if _WATCH is not None:
        text = f"{_WATCH.rank}\t{type(exc).__name__}\t{' '.join(str(exc).split())}\t{int(user)}"
        with contextlib.suppress(Exception):
            _WATCH.claim(text)
        _WATCH.linger()  # rank 0 may host the store: let the peers read the report first
    return 2 if user else 1


def run_protected(body: Callable[[], int]) -> int:
    """Run a distributed stage's ``body``; on failure with a process group, report it
    (:func:`fail_fast`) and leave with ``os._exit`` — no barrier, no exit hook can hang."""
    try:
        return body()
    except BaseException as exc:  # noqa: BLE001
        if not dist.is_initialized() or dist.world_size() < 2 or isinstance(exc, SystemExit):
            raise  # one process (training's private group included): the caller's policy
        status = fail_fast(exc)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
