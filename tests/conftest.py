"""Shared pytest fixtures. Service fixtures (S3, SLURM) live in their own plugin modules."""

import os
import sys

# Tests run the CLI entry points in-process and in subprocesses; both import the package
# from the checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("DS_ACCELERATOR", "cpu")

pytest_plugins = ["tests.s3_server", "tests.slurm_cluster"]
