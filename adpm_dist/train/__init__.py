"""Training an ε-network: the loop (``python -m adpm_dist.train``), its config, the
DeepSpeed engine, the loss, the EMA and the run directory."""
