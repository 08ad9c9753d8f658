"""The ONLY module that reads SLURM/torchrun environment or calls torch.distributed.

Every stage asks this module who it is (``env_info``), sets up the process
group once (``init``), reduces with ``all_reduce_sum`` and ends with
``shutdown``. Single-process runs need no environment at all.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as 'n[1-2],m3' without calling scontrol."""
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def env_info(environ=None) -> DistInfo:
    """Rank and world from torchrun's variables, else SLURM's, else a single process.

    torchrun wins when both are present (``srun torchrun`` sets both; the
    SLURM ids then describe the launcher, not the worker).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            node_rank=int(env.get("GROUP_RANK", env.get("NODE_RANK", 0))),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        ntasks = int(env["SLURM_NTASKS"])
        nodes = max(int(env.get("SLURM_NNODES", 1)), 1)
        return DistInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=ntasks,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=max(ntasks // nodes, 1),
            node_rank=int(env.get("SLURM_NODEID", 0)),
            master_addr=env.get("MASTER_ADDR")
            or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)),
            source="slurm",
        )
    return DistInfo()


def env_vars(info: DistInfo) -> dict[str, str]:
    """The torchrun-style variables describing ``info`` (for this process or a child's env)."""
    return {
        "RANK": str(info.rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank),
        "LOCAL_WORLD_SIZE": str(info.local_world_size),
        "NODE_RANK": str(info.node_rank),
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": str(info.master_port),
    }


def export_env(info: DistInfo) -> None:
    """Write the torchrun-style variables (DeepSpeed and init_method='env://' read them)."""
    os.environ.update(env_vars(info))


def scheduler_info(environ=None) -> dict:
    """What the batch scheduler says about this process: SLURM job id, node name, restarts.

    ``restart_count`` is how many times SLURM requeued the job (0 on the first run);
    all values are None outside a SLURM job.
    """
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    return {
        "job_id": job_id,
        "node_name": env.get("SLURMD_NODENAME"),
        "restart_count": int(env.get("SLURM_RESTART_COUNT", 0)) if job_id else None,
    }


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


BACKEND_ENV = "ADPM_DIST_BACKEND"


def default_backend() -> str:
    """NCCL on GPU, gloo on CPU; ``ADPM_DIST_BACKEND=gloo`` forces gloo on a GPU machine (the
    network still runs on the GPU; collectives go through host memory): e.g. two ranks sharing
    one GPU, which NCCL refuses ("Duplicate GPU detected")."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced and forced not in ("nccl", "gloo"):
        raise ValueError(f"{BACKEND_ENV}={forced!r}: use nccl or gloo")
    return forced or ("nccl" if torch.cuda.is_available() else "gloo")


def init(timeout_s: float = 600.0) -> DistInfo:
    """Set up torch.distributed when world_size > 1 (NCCL on GPU, gloo on CPU; see
    :func:`default_backend`). Idempotent."""
    info = env_info()
    if info.distributed and not tdist.is_initialized():
        export_env(info)
        backend = default_backend()
        if backend == "nccl":
            torch.cuda.set_device(device_for(info))
        tdist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return info


def init_group(timeout_s: float = 600.0) -> DistInfo:
    """``init()``, and for a single process a private one-member group as well.

    Engines such as DeepSpeed need a process group even when there is one
    process. An in-memory ``HashStore`` needs no port, so single-process runs
    side by side (tests, notebooks) never collide on MASTER_PORT.
    """
    info = init(timeout_s)
    if not info.distributed and not tdist.is_initialized():
        export_env(info)  # DeepSpeed reads RANK/LOCAL_RANK/... from the environment
        backend = default_backend()
        if backend == "nccl":
            torch.cuda.set_device(device_for(info))
        tdist.init_process_group(
            backend=backend,
            store=tdist.HashStore(),
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return info


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def collective_device(backend: str | None = None) -> torch.device:
    """Where a tensor must be for a collective of ``backend`` (default: the group's): NCCL
    reduces CUDA tensors only (this rank's GPU, the one ``init`` selected), gloo CPU tensors."""
    if backend is None:
        backend = tdist.get_backend() if is_initialized() else "gloo"
    if str(backend) == "nccl":
        return torch.device("cuda", env_info().local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks in place (a no-op in a single process); returns the tensor, wherever it
    lives (it travels to the backend's device and back when it must)."""
    if is_initialized():
        device = collective_device()
        if tensor.device != device:
            moved = tensor.to(device)
            tdist.all_reduce(moved, op=tdist.ReduceOp.SUM)
            tensor.copy_(moved)
        else:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj) -> list:
    if not is_initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown(barrier: bool = True) -> None:
    """barrier + destroy_process_group (DeepSpeed on CPU can abort at exit otherwise).

    After a failure never wait in the barrier (``barrier=False``): the peers may sit in
    another collective. With several ranks a failing rank does not call this at all; it
    leaves with ``os._exit`` (:func:`adpm_dist.io.collective.run_protected`).
    """
    if is_initialized():
        if barrier:
            tdist.barrier()
        tdist.destroy_process_group()
