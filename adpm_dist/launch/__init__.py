"""Running a stage on SLURM (submitit) or as local process groups: ``python -m adpm_dist.launch``."""
