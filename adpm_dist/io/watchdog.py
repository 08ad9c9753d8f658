"""The watchdog thread of the failure protocol (:mod:`adpm_dist.io.collective`): heartbeats,
the collective timeout, liveness, and the store report every rank leaves with.

Each rank's watchdog, about once a second:

- publishes ``2·round + waiting`` (``hb/<rank>``, for the collective timeout's message) and
  bumps its liveness counter (``alive/<rank>``, ``store.add``);
- leaves with the line of a report another rank wrote (``abort``);
- **liveness**: a peer whose counter has not moved for :data:`LIVENESS_S` seconds
  (``$ADPM_LIVENESS_TIMEOUT``), as timed by THIS rank's monotonic clock (no clocks are
  compared across machines), is gone: killed, stopped (SIGSTOP) or its node lost. Only peers
  seen alive once are judged (start-up skew); a rank that ends its run normally marks its
  counter done (:data:`DONE`). The watchdog reports ``rank N stopped responding`` and exits 1.
  This ends the survivors where no collective breaks (NCCL, a frozen process);
- **collective timeout**: no progress in the round for longer than :meth:`Watchdog.limit`;
- a lost store (its host, rank 0 started without a torchrun agent, is gone): leave after
  :data:`LIVENESS_S` naming rank 0 (with ``TORCHELASTIC_USE_AGENT_STORE=True`` the store is
  the agent's: wait for the collective timeout as before).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time

from adpm_dist.errors import UserError

TIMEOUT_ENV = "ADPM_COLLECTIVE_TIMEOUT"
SLOW_TIMEOUT_S = 600.0  # start-up and slow phases; also the auto timeout before 5 rounds
MIN_AUTO_TIMEOUT_S = 60.0
AUTO_FACTOR = 20.0
LIVENESS_ENV = "ADPM_LIVENESS_TIMEOUT"
LIVENESS_S = 15.0  # a peer's liveness counter still this long: it is gone (issue 22: < 30 s)
DONE = 1 << 40  # added to a rank's liveness counter when it ends normally: never judged again
GONE_KINDS = ("TimeoutError", "NoHeartbeat")  # reports whose message is the line itself


class RankFailed(RuntimeError):
    """Another rank failed; ``status`` is the exit status this rank should end with."""

    def __init__(self, rank: int, kind: str, message: str, user_error: bool):
        super().__init__(f"rank {rank} failed: {kind}: {message}")
        self.rank, self.status = rank, 2 if user_error else 1


def timeout_from(value: float | None) -> float:
    """The configured timeout: ``value`` when > 0, else ``$ADPM_COLLECTIVE_TIMEOUT``, else 0 (auto)."""
    if value:
        return float(value)
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return max(float(text), 0.0) if text else 0.0
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None


def liveness_s() -> float:
    """``$ADPM_LIVENESS_TIMEOUT`` when a positive number, else :data:`LIVENESS_S`."""
    try:
        value = float(os.environ.get(LIVENESS_ENV, "") or LIVENESS_S)
    except ValueError:
        raise UserError(f"{LIVENESS_ENV}={os.environ[LIVENESS_ENV]!r} is not a number of seconds") from None
    return value if value > 0 else LIVENESS_S


def agent_store() -> bool:
    """The rendezvous store lives in torchrun's agent, not in rank 0."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


class Watchdog:
    """Heartbeats, liveness and the collective timeout of one rank (see the module doc)."""

    def __init__(self, store, rank: int, world: int, timeout: float, prefix: str,
                 liveness: float | None = None, clock=time.monotonic):
        self.store, self.rank, self.world, self.prefix = store, rank, world, prefix
        self.fixed = timeout  # 0: auto
        self.liveness = liveness or liveness_s()
        self.clock = clock
        self.round, self.waiting, self.slow_depth = 0, False, 0
        self.started = clock()
        self.durations: list[float] = []
        self.lock = threading.Lock()
        self.published = None
        self.present: set[int] = set()  # peers whose liveness counter exists
        self.seen: dict[int, tuple[int, float]] = {}  # peer: (counter, when it last moved)
        self.stop = threading.Event()
        self.poll_s = 1.0 if not timeout else min(1.0, max(timeout / 10.0, 0.05))
        self._publish()
        self.thread = threading.Thread(target=self._run, name="adpm-watchdog", daemon=True)
        self.thread.start()

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
        now = self.clock()
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
        with self.lock:
            self.store.add(self.key(f"alive/{self.rank}"), 1)
            if code != self.published:
                self.store.set(self.key(f"hb/{self.rank}"), str(code))
        self.published = code

    def finish(self) -> None:
        """This rank ends its run normally: stop, and tell the peers not to judge it."""
        self.stop.set()
        with contextlib.suppress(Exception), self.lock:
            self.store.add(self.key(f"alive/{self.rank}"), DONE)

    def report(self) -> str | None:
        """The report in the store, if any; reading one acknowledges it (see :meth:`linger`)."""
        with self.lock:
            if self.store.check([self.key("abort")]):
                text = self.store.get(self.key("abort")).decode()
                with contextlib.suppress(Exception):
                    self.store.set(self.key(f"ack/{self.rank}"), "1")
                return text
        return None

    def linger(self, limit_s: float = 5.0) -> None:
        """Before the store's host (rank 0 without a torchrun agent) leaves after a report:
        wait until every peer has read it (or ``limit_s``), so no peer finds the store gone
        instead of the report (a dead peer never reads it: hence the limit)."""
        if self.rank != 0 or agent_store():
            return
        keys = [self.key(f"ack/{r}") for r in range(1, self.world)]
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception), self.lock:
                if self.store.check(keys):
                    return
            time.sleep(0.05)

    def claim(self, text: str) -> str:
        """Write this rank's report unless another rank's came first; the report that stands."""
        with self.lock:
            got = self.store.compare_set(self.key("abort"), "", text)
            with contextlib.suppress(Exception):  # this rank has seen the report that stands
                self.store.set(self.key(f"ack/{self.rank}"), "1")
        return got.decode() if isinstance(got, bytes) else str(got)

    def heartbeats(self) -> dict[int, int]:
        keys = [self.key(f"hb/{r}") for r in range(self.world)]
        with self.lock:
            present = [r for r, k in zip(range(self.world), keys) if self.store.check([k])]
            values = self.store.multi_get([keys[r] for r in present]) if present else []
        return {r: -1 for r in range(self.world)} | {r: int(v) for r, v in zip(present, values)}

    def own_count(self) -> int:
        """This rank's own liveness counter (its watchdog bumps it every poll)."""
        with self.lock:
            return int(self.store.add(self.key(f"alive/{self.rank}"), 0))

    def counters(self) -> dict[int, int]:
        """The peers' liveness counters (those that exist yet)."""
        with self.lock:
            for r in range(self.world):
                if r != self.rank and r not in self.present and self.store.check([self.key(f"alive/{r}")]):
                    self.present.add(r)
            peers = sorted(self.present)
            values = self.store.multi_get([self.key(f"alive/{r}") for r in peers]) if peers else []
        return {r: int(v) for r, v in zip(peers, values)}

    def stale(self, counters: dict[int, int], now: float) -> list[int]:
        """Update when each peer's counter last moved; the peers still for ``liveness`` s."""
        for r, value in counters.items():
            if r not in self.seen or self.seen[r][0] != value:
                self.seen[r] = (value, now)
        return sorted(r for r, (value, moved) in self.seen.items()
                      if value < DONE and now - moved > self.liveness)

    def _run(self) -> None:
        lost_at = None
        while not self.stop.wait(self.poll_s):
            now = self.clock()
            waited = now - self.started
            if lost_at is not None:  # the store's host (rank 0 without a torchrun agent) has gone
                if not agent_store() and now - lost_at > self.liveness:
                    _leave(f"error: rank 0 (the rendezvous store's host) is gone: rank {self.rank} lost "
                           f"the store {now - lost_at:.0f} s ago (rank 0 killed, or its node lost?)", 1)
                if waited > self.limit():
                    _leave(f"error: collective timeout after {waited:.0f} s on rank {self.rank}; "
                           "the rendezvous store is gone (rank 0 exited?)", 1)
                with contextlib.suppress(Exception):  # a passing store error is no lost host
                    self._publish()
                    lost_at = None
                continue
            try:
                self._publish()
                text = self.report()
                if text is not None:
                    _leave(*report_line(text, self.rank))
                gone = self.stale(self.counters(), self.clock())
                if gone:
                    self._gone(gone)
                if waited > self.limit():
                    self._timed_out(waited)
            except Exception:  # noqa: BLE001 - the main thread's collective will say more
                lost_at = self.clock()

    def _gone(self, gone: list[int]) -> None:
        names = ", ".join(map(str, gone))
        what = f"{'rank' if len(gone) == 1 else 'ranks'} {names}"
        text = (f"{gone[0]}\tNoHeartbeat\t{what} stopped responding (no heartbeat for "
                f"{self.liveness:.0f} s: killed, frozen or its node is gone; ${LIVENESS_ENV})\t0")
        self._leave_reported(text)

    def _leave_reported(self, text: str) -> None:
        """Claim ``text`` as the report (unless another stands), let the peers read it, leave."""
        line = report_line(self.claim(text), self.rank)
        _leave(*line, before_exit=self.linger)

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
        self._leave_reported(text)


LEAVING = threading.Lock()  # held by whichever thread ends the process


def _leave(line: str, status: int, before_exit=None) -> None:
    """Print ``line`` once per process and end it now (another thread may be in a collective).

    ``before_exit`` (e.g. :meth:`Watchdog.linger`) runs after the line, with the leaving lock
    held, so the main thread cannot report the broken collective meanwhile."""
    if not LEAVING.acquire(blocking=False):
        time.sleep(3600)  # another thread is already leaving
    with contextlib.suppress(Exception):  # a closed stream must not stop the exit
        if sys.stdout.isatty():  # a progress bar (rich) hid the cursor and holds the line
            sys.stdout.write("\x1b[?25h\n")
        sys.stdout.flush()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    if before_exit is not None:
        with contextlib.suppress(Exception):
            before_exit()
    os._exit(status)


def parse(text: str) -> tuple[int, str, str, bool]:
    rank, kind, message, user = text.split("\t", 3)
    return int(rank), kind, message, user == "1"


def report_line(text: str, own_rank: int) -> tuple[str, int]:
    """The ``error:`` line and exit status rank ``own_rank`` shows for a report in the store."""
    rank, kind, message, user = parse(text)
    status = 2 if user else 1
    if kind in GONE_KINDS:  # the same line on every rank, whichever rank noticed first
        return f"error: {message}", status
    if rank == own_rank:
        return f"error: {kind}: {message}", status
    return f"error: {RankFailed(rank, kind, message, user)}", status
