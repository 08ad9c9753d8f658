"""Everything that touches the outside world: storage URLs (local, file://, s3://),
shard sets and their streams, bad-input accounting, torch.distributed, preemption."""
