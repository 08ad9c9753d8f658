"""Run any stage on N nodes × G GPUs: on SLURM through submitit, or as local processes.

    python -m adpm_dist.launch train --nodes 4 --gpus-per-node 8 --wait -- --config configs/cifar10.yaml
    python -m adpm_dist.launch selftest --nodes 2 --cluster local -- --out report.json
    python -m adpm_dist.launch plan ...          # adpm_dist.stages.plan.main, on this machine
    python -m adpm_dist.launch module --nodes 2 -- mypkg.job ARGS   # mypkg.job.main(ARGS)

Everything after ``--`` (and any argument the launcher does not know) goes to the
stage's ``main(argv)`` unchanged, after the stage's own parser (for train, the config merge)
has checked it here (train, estimate, sample, evaluate): a typo exits 2 with the stage's
``error:`` line before anything is submitted or started (``task.check_stage_argv``; stage
``module`` cannot be checked, selftest reports its errors from the job).

**SLURM** (``--cluster slurm``, or ``auto`` when a controller answers): one
sbatch job with ``--nodes N``, one task per GPU (``--tasks-per-node T`` on CPU
clusters), submitted with submitit. Every task turns SLURM's variables into
torchrun's through ``dist`` and runs the stage's ``main(argv)`` in-process.
The launcher prints the job id and log paths; ``--wait`` follows the job, relays
rank 0's latest ``progress:`` line, and exits with its status. A failure is
reported with the rank that failed first (a task killed by a signal before the
peers that then lost their connection), its ``error:`` or exception line and its
log; ``srun --kill-on-bad-exit`` ends the other tasks instead of leaving them in a
rendezvous. On success the stage's own final line (e.g. the Γ job's summary) is shown.

**Threads**: every rank is limited to ``threads per rank`` CPU threads
(``adpm_dist/launch/threads.py``), reported at the start.

**Requeue**: the job asks SLURM for SIGUSR1 ahead of its time limit. Stages
that handle it (``preempt``) checkpoint and return ``preempt.REQUEUE_EXIT_CODE``;
rank 0 then requeues the job (``scontrol requeue``: the same job id runs the
same argv again, and the stage resumes from its checkpoint). A stage without a
handler is requeued on the signal directly (stages are resumable by rerun), and
submitit's own checkpoint hook (SIGUSR2) resubmits the same argv too. The job
is requeued only while SLURM still lists it RUNNING: after ``scancel``, a time
limit, or a preemption SLURM requeues itself, the launcher leaves it alone.

**Local** (``--cluster local``, or ``auto`` without SLURM): N × G processes on
this machine with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
NODE_RANK, MASTER_ADDR=127.0.0.1, ...). A process that fails ends the others
(after 3 s in which their own failures are collected); a run whose stage asked for
a requeue is restarted with the same argv.

Exit status: 0 success (or submitted, without ``--wait``); 1 the job failed;
2 usage error (the launcher's, or the stage's own user error: its ``error:`` line is
shown), no SLURM reachable, or submission rejected (SLURM's reason is shown);
75 (``REQUEUE_EXIT_CODE``) stopped after a checkpoint, rerun to resume.

Modules: this one is the command line; ``spec`` says what to run where; ``task`` is
what each rank runs (and requeues); ``slurm`` submits and follows SLURM jobs; ``local``
runs local process groups; ``status`` holds exit statuses and the status line;
``report`` reads the ranks' logs (progress, summary, who failed first and why);
``threads`` decides the threads per rank.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from adpm_dist.errors import (
    UsageError,
    UserArgumentParser,
    nonnegative_int,
    positive_float,
    positive_int,
    run_cli,
)
from adpm_dist.launch.local import run_local
from adpm_dist.launch.slurm import follow_slurm, slurm_reachable, submit_slurm
from adpm_dist.launch.spec import LaunchSpec
from adpm_dist.launch.status import EXIT_FAILED, EXIT_OK, LaunchError
from adpm_dist.launch.task import MODULE_STAGE, STAGES, check_stage_argv, local_worker, stage_module
from adpm_dist.launch.threads import describe, local_threads, user_threads

# Stages that only ever run here (no cluster), forwarded as they are.
LOCAL_ONLY = {"plan": "adpm_dist.stages.plan"}


def build_parser() -> argparse.ArgumentParser:
    p = UserArgumentParser(
        prog="python -m adpm_dist.launch",
        description="Run a stage on N nodes × G GPUs: on SLURM through submitit, or as local "
                    "processes. Arguments after '--' (and any the launcher does not know) go to "
                    "the stage unchanged. Stage 'module' runs MODULE.main(argv) of any importable "
                    "module: '... module -- pkg.mod ARGS'.",
        epilog="Exit status: 0 done (or submitted, without --wait); 1 the job failed; 2 a usage "
               "error (the launcher's, or the stage's own 'error:' line), no SLURM reachable, or "
               "the submission was rejected; 75 stopped after a checkpoint: rerun to resume.",
        allow_abbrev=False,
    )
    p.add_argument("stage", choices=sorted(STAGES) + [MODULE_STAGE] + sorted(LOCAL_ONLY),
                   help="what to run: train, estimate (the Γ job), sample, evaluate, selftest (check "
                        "an allocation), module (any module's main; its arguments are not checked "
                        "before submitting), plan (only on this machine). The arguments of train, "
                        "estimate, sample and evaluate are checked here by the stage's own parser "
                        "first: a typo exits 2 before anything is submitted")
    p.add_argument("--nodes", type=positive_int, default=1, metavar="N",
                   help="nodes to run on; locally they are simulated (default: 1)")
    p.add_argument("--gpus-per-node", type=nonnegative_int, default=0, metavar="G",
                   help="GPUs per node, one process per GPU; 0 runs on CPU (default: 0)")
    p.add_argument("--tasks-per-node", type=positive_int, default=None, metavar="T",
                   help="processes per node on CPU (default: 1; with GPUs it is --gpus-per-node)")
    p.add_argument("--cpus-per-task", type=positive_int, default=None, metavar="C",
                   help="SLURM: CPUs per process, also its thread count (default: SLURM's, "
                        "usually 1)")
    p.add_argument("--threads-per-rank", type=positive_int, default=None, metavar="N",
                   help="CPU threads each process may use (OMP_NUM_THREADS, torch). Default: "
                        "OMP_NUM_THREADS when set, else on SLURM --cpus-per-task (or the job's "
                        "CPUs on the node ÷ its tasks there), locally the cores ÷ the processes")
    p.add_argument("--partition", metavar="P", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--account", metavar="A", help="SLURM account to charge (default: yours)")
    p.add_argument("--qos", metavar="Q", help="SLURM quality of service (default: none)")
    p.add_argument("--time", dest="time_min", type=positive_int, default=60, metavar="MINUTES",
                   help="SLURM time limit in minutes; the job is warned with SIGUSR1 before it "
                        "and checkpoints and requeues (default: 60)")
    p.add_argument("--cluster", choices=("auto", "slurm", "local"), default="auto",
                   help="slurm, local (processes on this machine), or auto: SLURM when "
                        "'scontrol ping' answers, else local (default: auto)")
    p.add_argument("--wait", action="store_true",
                   help="SLURM: follow the job (state, latest progress line) until it ends and "
                        "exit with its status (default: print the job id and return; local runs "
                        "always wait)")
    p.add_argument("--wait-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="stop following after this many seconds and exit 1; a SLURM job keeps "
                        "running, a local run is stopped (default: no limit)")
    p.add_argument("--log-dir", default="runs/launch", metavar="DIR",
                   help="one folder per launch with the ranks' logs; on SLURM it must be on a "
                        "filesystem the nodes share (default: runs/launch)")
    p.add_argument("--job-name", metavar="NAME",
                   help="the job's name in squeue and sacct (default: adpm-<stage>)")
    p.add_argument("--max-requeues", type=nonnegative_int, default=10, metavar="K",
                   help="after a checkpoint-and-requeue, rerun at most this many times "
                        "(default: 10)")
    return p


def parse_args(argv: list[str]) -> LaunchSpec:
    """Parse launcher options; the stage's own arguments pass through untouched."""
    if "--" in argv:
        cut = argv.index("--")
        own, passthrough = argv[:cut], argv[cut + 1:]
    else:
        own, passthrough = argv, []
    parser = build_parser()
    ns, unknown = parser.parse_known_args(own)
    spec = LaunchSpec(stage=ns.stage, stage_argv=unknown + passthrough, nodes=ns.nodes,
                      gpus_per_node=ns.gpus_per_node, tasks_per_node=ns.tasks_per_node,
                      cpus_per_task=ns.cpus_per_task, threads_per_rank=ns.threads_per_rank,
                      partition=ns.partition, account=ns.account, qos=ns.qos,
                      time_min=ns.time_min, cluster=ns.cluster, wait=ns.wait,
                      wait_timeout=ns.wait_timeout, log_dir=ns.log_dir, job_name=ns.job_name,
                      max_requeues=ns.max_requeues)
    if spec.gpus_per_node > 0 and spec.tasks_per_node not in (None, spec.gpus_per_node):
        raise UsageError(f"--tasks-per-node {spec.tasks_per_node} conflicts with --gpus-per-node "
                         f"{spec.gpus_per_node} (one process per GPU)")
    stage_module(spec.stage, spec.stage_argv)  # 'module' without a module name is refused here
    return spec


# ------------------------------------------------------------------ entry points


def _run_folder(spec: LaunchSpec) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(spec.log_dir).absolute() / f"{spec.stage}-{stamp}-{uuid.uuid4().hex[:6]}"


def _check_stage(spec: LaunchSpec) -> None:
    name, _ = stage_module(spec.stage, spec.stage_argv)
    try:
        found = importlib.util.find_spec(name) is not None
    except ImportError:  # its parent package is missing
        found = False
    if not found:
        raise LaunchError(f"stage '{spec.stage}' is not available: no module {name}")


def launch(spec: LaunchSpec, out: Callable[[str], None] = print) -> int:
    """Run or submit ``spec``; returns the launcher's exit status."""
    _check_stage(spec)
    # The stage's own checks first: a typo is its `error:` line here, before any job or process.
    check_stage_argv(spec.stage, spec.stage_argv)
    cluster = spec.cluster
    if cluster == "auto":
        ok, reason = slurm_reachable()
        cluster = "slurm" if ok else "local"
        if not ok:
            out(f"[launch] no SLURM reachable ({reason}); running on this machine")
    folder = _run_folder(spec)
    if cluster == "local":
        threads = local_threads(spec.threads_per_rank, os.environ, spec.world_size)
        out(f"[launch] {spec.stage}: {spec.world_size} local processes "
            f"({spec.nodes} node(s) × {spec.procs_per_node}); logs: {folder}/rank*.log")
        out(f"[launch] {describe(*threads)}")
        outcome = run_local(spec, folder, threads[0])
    else:
        threads = user_threads(spec.threads_per_rank, os.environ)
        job = submit_slurm(spec, folder, threads)
        out(f"[launch] submitted {spec.stage} as SLURM job {job.job_id}: {spec.nodes} node(s) × "
            f"{spec.procs_per_node} task(s)")
        out(f"[launch] logs: {job.task(0).paths.stdout} (rank 0), "
            f"{folder}/{job.job_id}_<rank>_log.out|err")
        if threads or spec.cpus_per_task:
            out(f"[launch] {describe(*(threads or (spec.cpus_per_task, '--cpus-per-task')))}")
        else:
            out("[launch] threads per rank: each task's CPUs from SLURM (SLURM_CPUS_ON_NODE ÷ its "
                "tasks on the node); rank 0's count follows once it starts")
        if not spec.wait:
            out(f"[launch] follow with: squeue -j {job.job_id}; stop with: scancel {job.job_id}")
            return EXIT_OK
        try:
            outcome = follow_slurm(job, spec.wait_timeout, out=out)
        except KeyboardInterrupt:
            out(f"[launch] stopped following; job {job.job_id} keeps running "
                f"(scancel {job.job_id})")
            return EXIT_FAILED
    out(f"[launch] {outcome.message}")
    return outcome.status


def _main(argv: Sequence[str] | None) -> int:
    argv = list(argv or [])
    if argv[:1] == ["_worker"]:
        return local_worker(argv[1:])
    if argv[:1] and argv[0] in LOCAL_ONLY:
        # Imported only when asked for: the module may not exist in every checkout.
        module = importlib.import_module(LOCAL_ONLY[argv[0]])
        rc = module.main(argv[1:])
        return 0 if rc is None else int(rc)
    return launch(parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Bad options, no cluster, a rejected submission (LaunchError) → one ``error:`` line and
    exit 2; anything else keeps its traceback (exit 1)."""
    return run_cli(_main, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
