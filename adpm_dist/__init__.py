"""adpm_dist: Analytic-DPM (Bao et al., ICLR 2022) at cluster scale.

The package is drawn in layers (docs/architecture.md); imports point down only:

    launch/        command line, SLURM and local launchers
    stages/        estimate, sample, evaluate, fid, plan, demo, selftest on one job core
    train/         the training loop, its config, DeepSpeed engine, EMA, run directory
    gamma          the Γ statistics file
    models/        ε-networks, checkpoint loading
    io/            storage (local and S3), shard sets, streams, torch.distributed, preemption
    diffusion/     pure maths: schedules, trajectories, variances, samplers, likelihood
    errors         the user-error family every layer raises

``python -m adpm_dist.{train,estimate,sample,evaluate,launch}`` are the entry points.
"""

__version__ = "0.1.0"
