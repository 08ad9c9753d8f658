"""The job core's own reduction inside the failure protocol (issue 22 §1), and the error policy
(issue 23): only UserError is a user error; a ValueError of the maths layer is a bug."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from adpm_dist.errors import raised_by_check
from adpm_dist.gamma import read_gamma
from adpm_dist.io import collective, watchdog
from tests.estimate_helpers import free_port, launch_ranks, tiny_job_inputs

ROOT = Path(__file__).resolve().parent.parent


def _args(inputs, out) -> list[str]:
    return ["--checkpoint", inputs["model"], "--data", inputs["data"], "--out", str(out),
            "--num-workers", "0", "--no-progress", "--timesteps", "1-20", "--data-batch", "2",
            "--flush-every", "1", "--batch-size", "16"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_thread_module")
def test_an_exception_inside_reduce_or_a_killed_rank_ends_both_and_the_rerun_finishes(tmp_path):
    inputs = tiny_job_inputs(tmp_path)
    ref, out = tmp_path / "ref.json", tmp_path / "out.json"
    assert [r[0] for r in launch_ranks(2, "adpm_dist.estimate", _args(inputs, ref))] == [0, 0]
    start = time.time()
    ranks = launch_ranks(2, "adpm_dist.estimate", _args(inputs, out), {collective.FAIL_RANK_ENV: "1:reduce"})
    (c0, t0, e0), (c1, t1, e1) = ranks
    assert (c0, c1) == (1, 1), (e0[-2000:], e1[-2000:])
    assert "Traceback" in e1 and "injected failure" in e1
    assert "error: rank 1 failed: RuntimeError: injected failure" in e0 and "Traceback" not in e0, e0[-2000:]
    fault = float(e1.split("adpm-test: injected exception on rank 1 at reduce t=")[1].split()[0])
    assert start + max(t0, t1) - fault < 30
    # kill -9 of rank 1 in a later round: rank 0's collective breaks, it finds no report, sees
    # rank 1's liveness counter stand still and exits 1 naming it (no 600 s process-group timeout)
    start = time.time()
    kill = {collective.FAIL_RANK_ENV: "1:3:kill", watchdog.LIVENESS_ENV: "5"}
    (c0, t0, e0), (c1, t1, e1) = launch_ranks(2, "adpm_dist.estimate", _args(inputs, out), kill)
    assert (c0, c1) == (1, -9), e0[-2000:]
    assert re.search(r"^error: rank 1 (failed: it )?stopped responding", e0, re.M), e0[-2000:]
    assert "Traceback" not in e0, e0[-2000:]
    fault = float(e1.split("adpm-test: injected kill on rank 1 at 3 t=")[1].split()[0])
    assert start + t0 - fault < 30
    assert [r[0] for r in launch_ranks(2, "adpm_dist.estimate", _args(inputs, out))] == [0, 0]
    got, want = read_gamma(str(out)), read_gamma(str(ref))
    np.testing.assert_array_equal(got.sum, want.sum)
    np.testing.assert_array_equal(got.sum_sq, want.sum_sq)
    np.testing.assert_array_equal(got.count, want.count)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_stopped_rank_is_named_by_liveness_before_any_timeout(tmp_path):
    """SIGSTOP of rank 1 while rank 0 waits for it in a collective (no collective breaks, as
    over NCCL for a dead peer): with a 300 s collective timeout, only rank 1's liveness counter
    standing still can end rank 0, within 30 s, naming rank 1."""
    inputs = tiny_job_inputs(tmp_path)
    port, procs, marks = free_port(), [], threading.Event()
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   **{collective.FAIL_RANK_ENV: "1:3:hang", watchdog.LIVENESS_ENV: "5"})
        argv = [sys.executable, "-m", "adpm_dist.estimate", *_args(inputs, tmp_path / "out.json"),
                "--collective-timeout", "300"]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))

    def watch_rank1():
        for line in procs[1].stderr:
            if "adpm-test: injected hang on rank 1" in line:
                marks.set()

    threading.Thread(target=watch_rank1, daemon=True).start()
    try:
        assert marks.wait(90), "rank 1 never reached round 3"
        time.sleep(1.0)  # rank 0 is in round 3's collectives; rank 1's watchdog still beats
        assert procs[0].poll() is None
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.time()
        err0 = procs[0].communicate(timeout=60)[1]
        took = time.time() - stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode == 1, err0[-2000:]
    assert 4 < took < 30, (took, err0[-2000:])  # ADPM_LIVENESS_TIMEOUT=5, not the 300 s timeout
    assert "error: rank 1 stopped responding (no heartbeat for 5 s" in err0, err0[-2000:]


# A numpy error inside the maths layer (σ² of a step built from coefficients of mismatched
# length) while the `plan` stage runs: before, resolve_variances turned every ValueError into
# "error: … exit 2" with no traceback.
BROKEN_MATHS = """
import sys, numpy as np
import adpm_dist.diffusion.analytic as a
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.gamma import GammaFile
sched = make_schedule("linear", 50)
gf = GammaFile.empty(sched, {"digest": "d0", "name": "toy"})
n = np.arange(1, 51 if sys.argv[2] != "partial" else 21)
for shift in (0.0, 0.01):
    gf.add(n, 1 - 0.95 * np.exp(-n / 30) - shift)
gf.contributions.append({"run_id": "t", "rank": 0, "world_size": 1, "samples": [0, 2]})
open(sys.argv[1], "w").write(gf.to_json())
if sys.argv[2] == "broken":
    orig = a.step_coefficients
    a.step_coefficients = lambda *x, **k: {n: np.append(v, 0.0) if n == "lam2" else v
                                           for n, v in orig(*x, **k).items()}
from adpm_dist.stages import plan
sys.exit(plan.main(["--gamma", sys.argv[1], "--steps", sys.argv[3], "--method", "analytic-ddpm"]))
"""


@pytest.mark.timeout(120)
def test_a_maths_valueerror_in_a_stage_is_a_bug_and_an_argument_check_a_user_error(tmp_path):
    def run(mode: str, steps: str):
        return subprocess.run([sys.executable, "-c", BROKEN_MATHS, str(tmp_path / "g.json"), mode, steps],
                              cwd=str(ROOT), capture_output=True, text=True, timeout=100)

    bug = run("broken", "4")
    assert bug.returncode == 1, bug.stderr[-2000:]
    assert "Traceback" in bug.stderr and "ValueError: operands could not be broadcast" in bug.stderr
    assert "error:" not in bug.stderr
    # The same translation still reports the diffusion layer's own argument checks as one line.
    user = run("partial", "4")  # Γ estimated at t = 1..20 only
    assert user.returncode == 2, user.stderr[-2000:]
    assert user.stderr.startswith("error: Γ is missing at timesteps") and "Traceback" not in user.stderr


def test_raised_by_check_tells_an_explicit_check_from_a_library_error():
    from adpm_dist.diffusion.trajectory import even_trajectory

    with pytest.raises(ValueError) as check:
        even_trajectory(10, 4, rounding="sideways")  # the layer's own `raise ValueError(...)`
    assert raised_by_check(check.value, "adpm_dist.diffusion")
    assert not raised_by_check(check.value, "adpm_dist.models")
    with pytest.raises(ValueError) as library:
        np.zeros(2) + np.zeros(3)
    assert not raised_by_check(library.value, "tests")  # numpy's error on a non-raise line


def test_the_watchdog_names_the_rank_that_did_not_arrive(monkeypatch):
    """Rank 0 of 2 waits in round 1's collectives; rank 1's heartbeat says it is still in round
    1's local work: after the timeout rank 0 reports rank 1, in the store and on its line."""
    import threading

    import torch.distributed as tdist

    left: list = []
    done = threading.Event()
    monkeypatch.setattr(watchdog, "_leave",
                        lambda line, status, **_: (left.append((line, status)), done.set()))
    store = tdist.HashStore()
    store.set("t/hb/1", "2")  # 2·round + waiting: round 1, not waiting
    watch = collective.Watchdog(store, rank=0, world=2, timeout=0.3, prefix="t")
    try:
        watch.tick(waiting=False)  # round 0 done (start-up allows 600 s; round 1 the 0.3 s)
        watch.tick(waiting=True)  # round 1: in its collectives
        assert done.wait(10)
    finally:
        watch.stop.set()
    line, status = left[0]
    assert status == 1 and line.startswith("error: collective timeout after ")
    assert "rank 1 did not arrive (still in round 1's local work" in line
    assert "rank 1 did not arrive" in store.get("t/abort").decode()


def test_timeout_from_flag_then_environment(monkeypatch):
    from adpm_dist.errors import UserError

    monkeypatch.setenv(collective.TIMEOUT_ENV, "42")
    assert collective.timeout_from(7) == 7.0 and collective.timeout_from(0) == 42.0
    monkeypatch.setenv(collective.TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match="ADPM_COLLECTIVE_TIMEOUT='soon'"):
        collective.timeout_from(None)
    monkeypatch.delenv(collective.TIMEOUT_ENV)
    assert collective.timeout_from(None) == 0.0  # auto


def test_liveness_names_a_peer_whose_counter_stands_still_on_the_watchers_own_clock(monkeypatch):
    """Staleness bookkeeping with a fake clock: a peer is judged only once seen, only after
    ``liveness`` s without a change of its counter, never once it marked its run done; the
    report it claims gives every rank the same line."""
    import torch.distributed as tdist

    left: list = []
    monkeypatch.setattr(watchdog, "_leave", lambda line, status, **_: left.append((line, status)))
    store, now = tdist.HashStore(), [0.0]
    watch = watchdog.Watchdog(store, rank=0, world=3, timeout=0, prefix="t", liveness=5, clock=lambda: now[0])
    watch.stop.set()  # the bookkeeping is driven by hand below
    watch.thread.join(5)
    assert watch.stale(watch.counters(), 0.0) == []  # no peer seen yet (rank 2 never is)
    store.add("t/alive/1", 1)
    assert watch.stale(watch.counters(), 0.0) == []
    store.add("t/alive/1", 1)  # rank 1 beats at t=4: its 5 s start again
    assert watch.stale(watch.counters(), 4.0) == []
    assert watch.stale(watch.counters(), 8.9) == []
    assert watch.stale(watch.counters(), 9.1) == [1]
    store.add("t/alive/1", 1)  # it came back (SIGCONT) before anyone acted
    assert watch.stale(watch.counters(), 9.2) == []
    watch._gone([1])
    line, status = left[0]
    assert status == 1 and line == ("error: rank 1 stopped responding (no heartbeat for 5 s: killed, frozen "
                                    "or its node is gone; $ADPM_LIVENESS_TIMEOUT)")
    assert watchdog.report_line(store.get("t/abort").decode(), 2) == (line, 1)  # rank 2's line
    store.add("t/alive/1", watchdog.DONE)  # rank 1 ended its run normally
    assert watch.stale(watch.counters(), 9.3) == [] and watch.stale(watch.counters(), 100.0) == []


def test_a_lost_store_names_rank_0_unless_the_agent_holds_it(monkeypatch):
    """The store's host gone (its calls fail): after ``liveness`` s the watchdog leaves naming
    rank 0; with torchrun's agent store it keeps waiting (a lost store means something else)."""
    import torch.distributed as tdist

    class Store:  # a HashStore whose every call fails once `broken`
        def __init__(self):
            self.inner, self.broken = tdist.HashStore(), False

        def __getattr__(self, name):
            if self.broken:
                raise ConnectionResetError("store host gone")
            return getattr(self.inner, name)

    for agent in ("", "True"):
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", agent)
        left: list = []
        done, store = threading.Event(), Store()

        def record(line, status, before_exit=None, left=left, done=done):
            left.append((line, status))
            done.set()

        monkeypatch.setattr(watchdog, "_leave", record)
        watch = watchdog.Watchdog(store, rank=1, world=2, timeout=0.3, prefix="t", liveness=0.3)
        try:
            store.broken = True
            assert done.wait(1.5) == (agent == "")
        finally:
            watch.stop.set()
        if not agent:
            assert left[0][1] == 1
            assert left[0][0].startswith("error: rank 0 (the rendezvous store's host) is gone")
