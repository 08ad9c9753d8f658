"""The jobs a user runs after training: estimate Γ, sample, evaluate (NLL, FID), plan,
the oracle demo and the cluster selftest. No stage imports another stage."""
