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
3. **Collective timeout** (the watchdog): each rank publishes ``2·round + waiting`` to the
   store about once a second (``hb/<rank>``; the main thread only bumps counters:
   :func:`arrive` before a round's collectives, :func:`progress` after them). When a rank
   has made no progress for longer than the timeout it names the ranks that did not
   arrive (the lowest heartbeat), reports it like a failure and exits 1. Timeout:
   ``--collective-timeout`` / ``train.collective_timeout`` / ``$ADPM_COLLECTIVE_TIMEOUT``;
   0 or unset = auto: 600 s until 5 rounds are measured, then max(60 s, 20 × the median
   round time). Start-up (round 0) and :func:`slow` phases (checkpoints, sample grids,
   final writes) always allow at least 600 s.

Test hook: ``ADPM_TEST_FAIL_RANK=R:K[:MODE]`` (:mod:`adpm_dist.io.fault_injection`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import numpy as np
import torch

from adpm_dist.errors import UserError, is_user_error, print_error_line
from adpm_dist.io import dist
from adpm_dist.io.fault_injection import FAIL_RANK_ENV, injected_fault  # noqa: F401 - re-exported

TIMEOUT_ENV = "ADPM_COLLECTIVE_TIMEOUT"
SLOW_TIMEOUT_S = 600.0  # start-up and slow phases; also the auto timeout before 5 rounds
MIN_AUTO_TIMEOUT_S = 60.0
AUTO_FACTOR = 20.0


class RankFailed(RuntimeError):
    """Another rank failed; ``status`` is the exit status this rank should end with."""

    def __init__(self, rank: int, kind: str, message: str, user_error: bool):
        super().__init__(f"rank {rank} failed: {kind}: {message}")
        self.rank, self.status = rank, 2 if user_error else 1


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


def timeout_from(value: float | None) -> float:
    """The configured timeout: ``value`` when > 0, else ``$ADPM_COLLECTIVE_TIMEOUT``, else 0 (auto)."""
    if value:
        return float(value)
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return max(float(text), 0.0) if text else 0.0
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None


class Watchdog:
    """Heartbeats and the collective timeout of one rank (see the module doc)."""

    def __init__(self, store, rank: int, world: int, timeout: float, prefix: str):
        self.store, self.rank, self.world, self.prefix = store, rank, world, prefix
        self.fixed = timeout  # 0: auto
        self.round, self.waiting, self.slow_depth = 0, False, 0
        self.started = time.monotonic()
        self.durations: list[float] = []
        self.lock = threading.Lock()
        self.published = None
        self.stop = threading.Event()
        self.poll_s = 1.0 if not timeout else min(1.0, max(timeout / 10.0, 0.05))
        self._publish()
        threading.Thread(target=self._run, name="adpm-watchdog", daemon=True).start()

    def limit(self) -> float:
        """Seconds this rank may wait without progress in its current round."""
        if self.fixed:
            steady = self.fixed
        elif len(self.durations) >= 5:
            steady = max(MIN_AUTO_TIMEOUT_S, AUTO_FACTOR * statistics.median(self.durations[-50:]))
        else:
            steady = SLOW_TIMEOUT_S
        if self.round == 0 or self.slow_depth:
            return max(steady, SLOW_TIMEOUT_S)
        return steady

    def tick(self, waiting: bool) -> None:
        now = time.monotonic()
        if waiting:
            self.waiting = True
            return
        if self.round > 0:
            self.durations.append(now - self.started)
            del self.durations[:-100]
        self.round, self.waiting, self.started = self.round + 1, False, now

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"
    def _publish(self) -> None:
        code = 2 * self.round + int(self.waiting)
        if code != self.published:
            with self.lock:
                self.store.set(self.key(f"hb/{self.rank}"), str(code))
            self.published = code

    def report(self) -> str | None:
        with self.lock:
            if self.store.check([self.key("abort")]):
                return self.store.get(self.key("abort")).decode()
        return None

    def claim(self, text: str) -> str:
        """Write this rank's report unless another rank's came first; the report that stands."""
        with self.lock:
            got = self.store.compare_set(self.key("abort"), "", text)
        return got.decode() if isinstance(got, bytes) else str(got)

    def heartbeats(self) -> dict[int, int]:
        keys = [self.key(f"hb/{r}") for r in range(self.world)]
        with self.lock:
            present = [r for r, k in zip(range(self.world), keys) if self.store.check([k])]
            values = self.store.multi_get([keys[r] for r in present]) if present else []
        return {r: -1 for r in range(self.world)} | {r: int(v) for r, v in zip(present, values)}

    def _run(self) -> None:
        lost = False
        while not self.stop.wait(self.poll_s):
            waited = time.monotonic() - self.started
            if lost:  # the store's host (rank 0 without a torchrun agent) has gone
                if waited > self.limit():
                    _leave(f"error: collective timeout after {waited:.0f} s on rank {self.rank}; "
                           "the rendezvous store is gone (rank 0 exited?)", 1)
                continue
            try:
                self._publish()
                text = self.report()
                if text is not None:
                    _leave(*_report_line(text))
                if waited > self.limit():
                    self._timed_out(waited)
            except Exception:  # noqa: BLE001 - the main thread's collective will say more
                lost = True

    def _timed_out(self, waited: float) -> None:
        beats = self.heartbeats()
        low, high = min(beats.values()), max(beats.values())
        behind = sorted(r for r, b in beats.items() if b == low)
        if low < high:
            names = ", ".join(map(str, behind))
            what = f"{'rank' if len(behind) == 1 else 'ranks'} {names} did not arrive"
            where = (f"(still in round {max(low, 0) // 2}'s local work; the others wait in round "
                     f"{high // 2}'s collectives)")
        else:
            what, where = "no rank made progress", f"(every rank is in round {low // 2})"
        text = (f"{self.rank}\tTimeoutError\tcollective timeout after {waited:.0f} s: {what} "
                f"{where}; limit {self.limit():.0f} s (train.collective_timeout, --collective-timeout, "
                f"${TIMEOUT_ENV})\t0")
        _leave(*_report_line(self.claim(text)))


_WATCH: Watchdog | None = None
_LEAVING = threading.Lock()


def _leave(line: str, status: int) -> None:
    """Print ``line`` once per process and end it now (another thread may be in a collective)."""
    if not _LEAVING.acquire(blocking=False):
        time.sleep(3600)  # another thread is already leaving
    with contextlib.suppress(Exception):  # a closed stream must not stop the exit
        if sys.stdout.isatty():  # a progress bar (rich) hid the cursor and holds the line
            sys.stdout.write("\x1b[?25h\n")
        sys.stdout.flush()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    os._exit(status)


def _parse(text: str) -> tuple[int, str, str, bool]:
    rank, kind, message, user = text.split("\t", 3)
    return int(rank), kind, message, user == "1"


def _report_line(text: str) -> tuple[str, int]:
    """The ``error:`` line and exit status this rank shows for a report in the store."""
    rank, kind, message, user = _parse(text)
    status = 2 if user else 1
    if kind == "TimeoutError":  # the same line on every rank, whichever rank noticed first
        return f"error: {message}", status
    if _WATCH is not None and rank == _WATCH.rank:
        return f"error: {kind}: {message}", status
    return f"error: {RankFailed(rank, kind, message, user)}", status


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
    global _WATCH
    if _WATCH is not None:
        _WATCH.stop.set()
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
            return None if _parse(text)[0] == _WATCH.rank else text
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def fail_fast(exc: BaseException) -> int:
    """A failure escaped every phase: report it (peers read it from the store) and return
    the status to ``os._exit`` with. :class:`RankFailed` is reported as is (no report)."""
    if not _LEAVING.acquire(blocking=False):
        time.sleep(3600)  # the watchdog is already ending this process
    if isinstance(exc, RankFailed):
        print_error_line(exc)
        time.sleep(1.0)  # let the failing rank end first: torchrun names the first as root cause
        return exc.status
    broken = isinstance(exc, getattr(torch.distributed, "DistError", ())) or any(
        s in str(exc) for s in ("gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe"))
    peer = peer_report(wait=2.0 if broken else 0.0)
    if peer is not None:  # our collective broke because a peer failed first
        line, status = _report_line(peer)
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
        if _WATCH.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            time.sleep(2 * _WATCH.poll_s)  # this process hosts the store: let the peers read it
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
