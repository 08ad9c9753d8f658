"""The ONE resumable sharded-job core under ``estimate``, ``evaluate nll`` and ``sample``.

A job is a :class:`ShardedJob` subclass; :func:`run_job` drives it on every rank:

1. **Verdict** — rank 0 looks at the output (:meth:`ShardedJob.existing`): a finished
   job with the same fingerprint is a no-op ("already complete"); another job's
   output is refused. Every rank learns the verdict.
2. **Resume** — each rank reloads its partial state (``PARTIAL/rank-R-of-W.json``),
   refusing state written by a different command (fingerprints compared after
   :meth:`ShardedJob.known_fingerprint`, which may translate older forms). When any rank
   reloaded some, rank 0 prints one line (:meth:`ShardedJob.resume_summary`) with the
   progress all ranks' state holds (:meth:`~ShardedJob.reduce`), where the bar then starts.
3. **Rounds** — in lock-step: local work (:meth:`~ShardedJob.step`), the partial
   state written atomically, one all-reduce of (failed ranks, "more" flag), then the
   job's own reduction (:meth:`~ShardedJob.reduce`) for progress and early stopping.
4. **Final write** — the ranks' payloads are gathered and rank 0 writes the result.
5. **Cleanup** — partial state removed, the process group shut down.

Failure of ANY rank ends every rank quickly, by the one protocol of
:mod:`adpm_dist.io.collective` (training uses it too). Each local phase runs through
:func:`together`: a rank that raises still joins the phase's all-reduce, with its
flag set; the failing rank re-raises its own error (exit 2 for a user error, else
1 with its traceback) and the others raise :class:`RankFailed` ("rank N failed: …",
same kind of exit status). An error outside any phase (in :meth:`ShardedJob.reduce`'s
collectives, before the first collective) is reported through the rendezvous store and
ends the process at once (``os._exit``); the peers read the report wherever they wait.
A rank that hangs is named by the collective timeout (``--collective-timeout`` where a
stage has the flag, else ``$ADPM_COLLECTIVE_TIMEOUT``; auto by default).

Test hook: ``ADPM_TEST_FAIL_RANK=R:K[:hang|kill|user]`` acts on rank R in its K-th
round (0-based); ``R:reduce`` in the job's reduction, ``0:write`` in the final write:
the propagation above is tested with faults that cannot be produced for real (as
root, an unwritable output location does not exist).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from collections.abc import Callable, Sequence

import numpy as np

from adpm_dist.diffusion.analytic import step_variances
from adpm_dist.diffusion.trajectory import make_trajectory
from adpm_dist.errors import UsageError, UserError, print_error_line, raised_by_check, run_cli
from adpm_dist.io import collective, dist, storage
from adpm_dist.io.collective import FAIL_RANK_ENV, RankFailed, injected_fault, settle, together
from adpm_dist.train.progress import progress

__all__ = ["FAIL_RANK_ENV", "RankFailed", "ShardedJob", "job_main", "main_wrapper", "run_job", "together"]


class PartialStateError(UserError, ValueError):
    """A rank's partial state cannot be read or belongs to another command."""


# ---------------------------------------------------------------- failure propagation
# The protocol lives in the io layer (adpm_dist.io.collective) so training uses it too;
# these names stay importable from here.

_settle = settle
_injected_fault = injected_fault


# ---------------------------------------------------------------- progress


class Progress:
    """The one progress display of the stages: the rich bar of :mod:`adpm_dist.train.progress`,
    on rank 0 only (when enabled); a no-op elsewhere."""

    def __init__(self, enabled: bool, label: str, total: int, completed: int = 0):
        self.bar = progress(enabled and dist.rank() == 0)
        self.bar.__enter__()
        self.task = self.bar.add_task(label, total=total, completed=completed)
        self.open = True

    def update(self, completed: int) -> None:
        self.bar.update(self.task, completed=completed)

    def close(self) -> None:
        if self.open:
            self.bar.__exit__(None, None, None)
            self.open = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- the job


class ShardedJob:
    """Hooks of one resumable sharded job; :func:`run_job` calls them in order."""

    label = "work"
    partial_dir: str | None = None  # folder of per-rank partial state (None: no partial files)
    fingerprint: dict = {}
    show_progress: bool = True
    progress_total: int = 0
    rank: int = 0
    world: int = 1

    def existing(self) -> bool:
        """Rank 0: True when the output is already complete; raise to refuse it."""
        return False

    def load_state(self, state: dict, source: str) -> None:
        """Resume from this rank's partial state (``state_dict``'s keys)."""

    def known_fingerprint(self, got: dict) -> dict:
        """A fingerprint read back (partial state), in today's form; override to accept older forms."""
        return got

    def resume_summary(self, completed: int) -> str:
        """Rank 0's line after a resume; ``completed``: the progress every rank's reloaded state holds."""
        where = storage.redact(str(self.partial_dir))
        return f"resumed from {where}: {completed}/{self.progress_total} done ({self.label})"

    def state_dict(self) -> dict | None:
        """This rank's partial state (JSON-able), or None when the job keeps none."""
        return None

    def step(self, round_index: int) -> bool:
        """One round of local work; True when this rank has more to do."""
        raise NotImplementedError

    def reduce(self, rounds: int) -> tuple[int, bool]:
        """Collective, after every round: (progress completed, stop early?)."""
        return 0, False

    def payload(self):
        """What this rank contributes to the final write (gathered to rank 0)."""
        return None

    def write(self, gathered: list) -> None:
        """Rank 0: write the result from every rank's payload."""

    def done_message(self) -> str:
        return "already complete, nothing to do"


def partial_url(job: ShardedJob) -> str:
    return storage.join(job.partial_dir, f"rank-{job.rank:05d}-of-{job.world:05d}.json")


def diff(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys)


def _resume(job: ShardedJob) -> bool:
    """Reload this rank's partial state; True when there was some."""
    if job.partial_dir is None:
        return False
    url = partial_url(job)
    if not storage.exists(url):
        return False
    want = {**job.fingerprint, "world_size": job.world}
    try:
        state = json.loads(storage.read_text(url))
        got = job.known_fingerprint(state["fingerprint"])
        if got == want:
            job.load_state(state, url)
    except (KeyError, TypeError, ValueError) as exc:
        raise PartialStateError(f"{url}: unreadable partial state ({exc}); delete it to start over") from None
    if got != want:
        raise PartialStateError(f"{url} was written by a different command ({diff(got, want)}); "
                                "rerun it unchanged or delete it")
    return True


def _resume_phase(job: ShardedJob) -> int:
    """Every rank reloads its partial state; rank 0 says so when any did. The progress to start from."""
    err, loaded = None, False
    try:
        loaded = _resume(job)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the peers
        err = exc
    if not _settle(err, [float(loaded)])[0]:
        return 0
    completed = job.reduce(0)[0]
    if job.rank == 0:
        print(job.resume_summary(completed), flush=True)
    return completed


def _round(job: ShardedJob, index: int) -> bool:
    """Local work + partial state, then one all-reduce of (failures, more); True if any rank has more."""
    err, more = None, False
    try:
        _injected_fault(job.rank, index)
        more = job.step(index)
        state = job.state_dict()
        if state is not None and job.partial_dir is not None:
            fingerprint = {**job.fingerprint, "world_size": job.world}
            storage.write_text(partial_url(job), json.dumps({"fingerprint": fingerprint, **state}))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the peers
        err = exc
    return bool(_settle(err, [float(more)])[0] > 0)


def _final_write(job: ShardedJob) -> None:
    """Gather the payloads (pickled inside a phase, so a payload that cannot travel fails
    there, not in the gather) and let rank 0 write the result."""
    blob = together(lambda: pickle.dumps(job.payload()))
    with collective.slow():
        blobs = dist.all_gather_object(blob)

        def write() -> None:
            injected_fault(job.rank, "write")
            job.write([pickle.loads(b) for b in blobs])

        together(write, rank0_only=True)


def run_job(job: ShardedJob, collective_timeout: float | None = None) -> int:
    """Drive ``job`` through verdict, resume, rounds, final write and cleanup (see module doc).

    ``collective_timeout``: seconds (None/0: ``$ADPM_COLLECTIVE_TIMEOUT``, else auto;
    :mod:`adpm_dist.io.collective`).
    """
    info = dist.init()
    job.rank, job.world = info.rank, info.world_size
    collective.start(collective_timeout)
    if together(job.existing, rank0_only=True, share=True):
        if job.rank == 0:
            print(job.done_message())
        collective.shutdown()
        return 0
    resumed = _resume_phase(job)
    rounds = 0
    with Progress(job.show_progress, job.label, job.progress_total, completed=resumed) as bar:
        while True:
            more = _round(job, rounds)
            rounds += 1
            # The job's own collectives: a rank raising in them reports through the store and
            # leaves (io.collective.run_protected); its peers read the report and leave too.
            injected_fault(job.rank, "reduce")
            collective.arrive()
            completed, enough = job.reduce(rounds)
            collective.progress()
            bar.update(completed)
            if not more or enough:
                break
    _final_write(job)
    if job.partial_dir is not None:
        together(lambda: storage.remove(partial_url(job)))
        together(lambda: storage.remove(job.partial_dir, recursive=True), rank0_only=True)
    collective.shutdown()
    return 0


# ---------------------------------------------------------------- shared stage pieces


def resolve_trajectory(kind: str, schedule, steps: int, gamma, **options) -> np.ndarray:
    """τ for (kind, K); K outside [2, N], or a Γ the trajectory needs but lacks, is a UsageError.

    ``options`` go to :func:`make_trajectory` (``rounding``; for 'optimal' ``fit``, ``cost``,
    ``method``, ``moments``).
    """
    n = schedule.num_timesteps
    if not 2 <= steps <= n:
        raise UsageError(f"--steps {steps}: need 2 <= K <= N = {n} (the schedule's timesteps)")
    if kind == "optimal" and gamma is None:
        raise UsageError("--trajectory optimal needs --gamma (a Γ file for this model)")
    try:
        return make_trajectory(kind, schedule, steps, gamma=gamma, **options)
    except ValueError as exc:  # the diffusion layer's argument checks (e.g. Γ missing at t)
        if not raised_by_check(exc, "adpm_dist.diffusion"):
            raise  # a bug in the maths (numpy's own error): traceback, exit 1
        raise UsageError(str(exc)) from None


def resolve_variances(schedule, tau, method: str, gamma, eta: float = 0.0, clip_pixel=None, **options):
    """:func:`step_variances` (``options``: ``fit``, ``moments``, ``direction``), its argument
    checks (Γ or moments missing on τ, η < 0) as UsageError; any other ValueError is a bug."""
    try:
        return step_variances(schedule, tau, method, gamma=gamma, eta=eta, clip_pixel=clip_pixel, **options)
    except ValueError as exc:
        if not raised_by_check(exc, "adpm_dist.diffusion"):
            raise
        raise UsageError(str(exc)) from None


def main_wrapper(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """The one CLI policy (:func:`adpm_dist.errors.run_cli`) plus the distributed endgame.

    User errors: one ``error:`` line, exit 2. A peer's failure: one ``error: rank N
    failed: …`` line, exit 2 or 1 like the failed rank. Anything else propagates
    (traceback, exit 1). Once a process group exists, a failing rank reports its failure
    (:func:`adpm_dist.io.collective.run_protected`) and leaves with ``os._exit``, so no
    exit-time hook can leave its peers waiting.
    """
    try:
        status = run_cli(lambda a: collective.run_protected(lambda: main(a)), argv)
    except RankFailed as exc:
        print_error_line(exc)
        status = exc.status
    if status != 0 and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def add_collective_timeout_flag(parser) -> None:
    """``--collective-timeout SECONDS`` for a stage's parser (read by :func:`job_main` and
    :func:`run_job` as ``args.collective_timeout``)."""
    from adpm_dist.errors import nonnegative_float

    parser.add_argument("--collective-timeout", type=nonnegative_float, default=None, metavar="SECONDS",
                        help="seconds (>= 0) a rank may wait for its peers before the job ends naming "
                             f"the ranks that did not arrive (default, or 0: ${collective.TIMEOUT_ENV}, "
                             "else auto: max(60, 20 x the median round time), >= 600 at start-up and in "
                             "final writes)")


def job_main(make_job: Callable, build_parser: Callable, argv: Sequence[str] | None = None) -> int:
    """The ``main()`` of a sharded stage: parse the flags, join the process group, run the job.

    ``make_job(args, rank, world_size)`` builds the job; its construction is one collective
    phase (:func:`together`), so a rank that cannot even start ends the others too.
    """
    def run(args_argv: Sequence[str] | None) -> int:
        args = build_parser().parse_args(args_argv)
        info = dist.init()
        collective.start(getattr(args, "collective_timeout", None))
        return run_job(together(lambda: make_job(args, info.rank, info.world_size)),
                       getattr(args, "collective_timeout", None))

    return main_wrapper(run, argv)
