"""How many CPU threads each rank may use, decided once and reported as ``threads per rank: N (from …)``.

Without a limit every rank starts one intra-op thread per core of the machine, so R ranks
on C cores run R × C threads and spend their time switching: the Γ job ran 10× slower
through the launcher than through torchrun (which sets ``OMP_NUM_THREADS=1``). The
count comes from, in order: ``--threads-per-rank``; ``OMP_NUM_THREADS`` set by the user;
on SLURM, ``SLURM_CPUS_PER_TASK`` (``--cpus-per-task``), else the CPUs SLURM gave the job
on the node (``SLURM_CPUS_ON_NODE``) ÷ its tasks there; locally, the cores this process
may use ÷ the local ranks. Always at least 1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Exported to every rank (and so to its data workers and any OpenMP/MKL code it loads).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroups), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _positive(environ: Mapping[str, str], key: str) -> int | None:
    """``environ[key]`` as a positive integer; None when unset, empty or not one."""
    text = environ.get(key, "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def user_threads(flag: int | None, environ: Mapping[str, str]) -> tuple[int, str] | None:
    """What the user asked for: ``--threads-per-rank``, else their ``OMP_NUM_THREADS``."""
    if flag is not None:
        return flag, "--threads-per-rank"
    omp = _positive(environ, "OMP_NUM_THREADS")
    return (omp, "OMP_NUM_THREADS") if omp else None


def local_threads(flag: int | None, environ: Mapping[str, str], ranks: int,
                  cores: int | None = None) -> tuple[int, str]:
    """Threads for each of ``ranks`` processes on this machine."""
    chosen = user_threads(flag, environ)
    if chosen:
        return chosen
    cores = usable_cores() if cores is None else cores
    return max(1, cores // ranks), f"{cores} cores ÷ {ranks} local ranks"


def slurm_threads(environ: Mapping[str, str], tasks_on_node: int) -> tuple[int, str]:
    """Threads for one SLURM task, from what SLURM allocated to it (no user choice)."""
    per_task = _positive(environ, "SLURM_CPUS_PER_TASK")
    if per_task:
        return per_task, "SLURM_CPUS_PER_TASK"
    on_node = _positive(environ, "SLURM_CPUS_ON_NODE") or usable_cores()
    return max(1, on_node // tasks_on_node), f"SLURM_CPUS_ON_NODE={on_node} ÷ {tasks_on_node} task(s)"


def describe(threads: int, source: str) -> str:
    return f"threads per rank: {threads} (from {source})"


def apply_threads(threads: int) -> None:
    """Limit this process (torch's intra-op pool) and whatever it starts to ``threads``."""
    import torch

    for key in THREAD_VARS:
        os.environ[key] = str(threads)
    torch.set_num_threads(threads)
