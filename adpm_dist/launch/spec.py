"""What a launch runs where: the stage, its argv, nodes, processes, SLURM settings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LaunchSpec:
    """What to run where. ``stage_argv`` goes to the stage's main() untouched."""

    stage: str
    stage_argv: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    threads_per_rank: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 60
    cluster: str = "auto"
    wait: bool = False
    wait_timeout: float | None = None
    log_dir: str = "runs/launch"
    job_name: str | None = None
    max_requeues: int = 10

    @property
    def procs_per_node(self) -> int:
        """One process per GPU; on CPU, --tasks-per-node (default 1)."""
        if self.gpus_per_node > 0:
            return self.gpus_per_node
        return self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node
