"""Run any stage on N nodes × G GPUs: on SLURM through submitit, or as local processes.

    python -m adpm_dist.launch train --nodes 4 --gpus-per-node 8 --wait -- --config configs/cifar10.yaml
    python -m adpm_dist.launch selftest --nodes 2 --cluster local -- --out report.json
    python -m adpm_dist.launch plan ...          # adpm_dist.stages.plan.main, on this machine

Everything after ``--`` (and any argument the launcher does not know) goes to the
stage's ``main(argv)`` unchanged.

**SLURM** (``--cluster slurm``, or ``auto`` when a controller answers): one
sbatch job with ``--nodes N``, one task per GPU (``--tasks-per-node T`` on CPU
clusters), submitted with submitit. Every task turns SLURM's variables into
torchrun's through ``dist`` and runs the stage's ``main(argv)`` in-process.
The launcher prints the job id and log paths; ``--wait`` follows the job and
exits with its status. A task that raises is reported with its traceback as
soon as its error record appears, and ``srun --kill-on-bad-exit`` ends the
other tasks instead of leaving them in a rendezvous.

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
NODE_RANK, MASTER_ADDR=127.0.0.1, ...). A process that fails ends the others at
once; a run whose stage asked for a requeue is restarted with the same argv.

Exit status: 0 success (or submitted, without ``--wait``); 1 the job failed;
2 usage error, no SLURM reachable, or submission rejected (SLURM's reason is
shown); 75 (``REQUEUE_EXIT_CODE``) stopped after a checkpoint, rerun to resume.

Modules: this one is the command line; ``spec`` says what to run where; ``task`` is
what each rank runs (and requeues); ``slurm`` submits and follows SLURM jobs; ``local``
runs local process groups; ``status`` holds exit statuses and the status line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from adpm_dist.errors import UsageError, UserArgumentParser, run_cli
from adpm_dist.launch.local import run_local
from adpm_dist.launch.slurm import follow_slurm, slurm_reachable, submit_slurm
from adpm_dist.launch.spec import LaunchSpec
from adpm_dist.launch.status import EXIT_FAILED, EXIT_OK, LaunchError
from adpm_dist.launch.task import STAGES, run_stage

# Stages that only ever run here (no cluster), forwarded as they are.
LOCAL_ONLY = {"plan": "adpm_dist.stages.plan"}


def build_parser() -> argparse.ArgumentParser:
    p = UserArgumentParser(
        prog="python -m adpm_dist.launch",
        description="Run a stage on SLURM (submitit) or as local processes. Arguments after "
                    "'--' (and unknown ones) go to the stage.",
        allow_abbrev=False,
    )
    p.add_argument("stage", choices=sorted(STAGES) + sorted(LOCAL_ONLY))
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node, one process each (default 0: CPU)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node on CPU (default 1; with GPUs it equals --gpus-per-node)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per process (SLURM)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--qos", help="SLURM quality of service")
    p.add_argument("--time", dest="time_min", type=int, default=60,
                   help="time limit in minutes (default 60)")
    p.add_argument("--cluster", choices=("auto", "slurm", "local"), default="auto",
                   help="auto: SLURM when a controller answers, else local (default)")
    p.add_argument("--wait", action="store_true",
                   help="follow the SLURM job and exit with its status (local runs always wait)")
    p.add_argument("--wait-timeout", type=float, default=None,
                   help="give up following after this many seconds (the job keeps running)")
    p.add_argument("--log-dir", default="runs/launch", help="logs and job records (default "
                   "runs/launch; on SLURM it must be on a filesystem the nodes share)")
    p.add_argument("--job-name", help="SLURM job name (default adpm-<stage>)")
    p.add_argument("--max-requeues", type=int, default=10,
                   help="requeue at most this many times (default 10)")
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
                      cpus_per_task=ns.cpus_per_task, partition=ns.partition,
                      account=ns.account, qos=ns.qos, time_min=ns.time_min, cluster=ns.cluster,
                      wait=ns.wait, wait_timeout=ns.wait_timeout, log_dir=ns.log_dir,
                      job_name=ns.job_name, max_requeues=ns.max_requeues)
    problems = []
    if spec.nodes < 1:
        problems.append("--nodes must be ≥ 1")
    if spec.gpus_per_node < 0:
        problems.append("--gpus-per-node must be ≥ 0")
    if spec.tasks_per_node is not None and spec.tasks_per_node < 1:
        problems.append("--tasks-per-node must be ≥ 1")
    if spec.gpus_per_node > 0 and spec.tasks_per_node not in (None, spec.gpus_per_node):
        problems.append(f"--tasks-per-node {spec.tasks_per_node} conflicts with --gpus-per-node "
                        f"{spec.gpus_per_node} (one process per GPU)")
    if spec.time_min < 1:
        problems.append("--time must be ≥ 1 minute")
    if problems:
        raise UsageError("; ".join(problems))
    return spec


# ------------------------------------------------------------------ entry points


def _run_folder(spec: LaunchSpec) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(spec.log_dir).absolute() / f"{spec.stage}-{stamp}-{uuid.uuid4().hex[:6]}"


def launch(spec: LaunchSpec, out: Callable[[str], None] = print) -> int:
    """Run or submit ``spec``; returns the launcher's exit status."""
    cluster = spec.cluster
    if cluster == "auto":
        ok, reason = slurm_reachable()
        cluster = "slurm" if ok else "local"
        if not ok:
            out(f"[launch] no SLURM reachable ({reason}); running on this machine")
    if importlib.util.find_spec(STAGES[spec.stage]) is None:
        raise LaunchError(f"stage '{spec.stage}' is not available: no module {STAGES[spec.stage]}")
    folder = _run_folder(spec)
    if cluster == "local":
        out(f"[launch] {spec.stage}: {spec.world_size} local processes "
            f"({spec.nodes} node(s) × {spec.procs_per_node}); logs: {folder}/rank*.log")
        outcome = run_local(spec, folder)
    else:
        job = submit_slurm(spec, folder)
        out(f"[launch] submitted {spec.stage} as SLURM job {job.job_id}: {spec.nodes} node(s) × "
            f"{spec.procs_per_node} task(s)")
        out(f"[launch] logs: {job.task(0).paths.stdout} (rank 0), "
            f"{folder}/{job.job_id}_<rank>_log.out|err")
        if not spec.wait:
            out(f"[launch] follow with: squeue -j {job.job_id}; stop with: scancel {job.job_id}")
            return EXIT_OK
        try:
            outcome = follow_slurm(job, spec.wait_timeout)
        except KeyboardInterrupt:
            out(f"[launch] stopped following; job {job.job_id} keeps running "
                f"(scancel {job.job_id})")
            return EXIT_FAILED
    out(f"[launch] {outcome.message}")
    return outcome.status


def _worker_main(argv: list[str]) -> int:
    """``python -m adpm_dist.launch _worker STAGE -- ARGS``: one local process."""
    stage, rest = argv[0], argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return run_stage(stage, rest)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(argv or [])
    if argv[:1] == ["_worker"]:
        return _worker_main(argv[1:])
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
