"""Shared pytest fixtures. Service fixtures (S3, SLURM) live in their own plugin modules."""

import os
import sys

import pytest

# Tests run the CLI entry points in-process and in subprocesses; both import the package
# from the checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("DS_ACCELERATOR", "cpu")

pytest_plugins = ["tests.s3_server", "tests.slurm_cluster", "pytester"]  # pytester: tests of the tiers


@pytest.fixture
def one_thread():
    """Run the test's torch ops on one intra-op thread.

    On the 2-core CI machine two intra-op threads contend with other processes (data
    workers, servers, ranks) and small kernels ran up to 100× slower than on one thread.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    """WebDataset shards of scikit-learn's digits (400 per shard), written by the data layer's
    tool; the URL pattern of the training split. Modules that need other shards define their own."""
    from tests.tool_modules import load_tool

    out = tmp_path_factory.mktemp("digits") / "shards"
    load_tool("make_shards").main(["digits", str(out), "--shard-size", "400"])
    return str(out / "train-*.tar")


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole module (``pytestmark = pytest.mark.usefixtures(...)``): the
    in-process Γ/NLL jobs of a module run on one intra-op thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The service a test needs follows from its fixtures, so the markers cannot go stale.
SERVICE_FIXTURES = {"s3_server": "s3", "slurm_cluster": "slurm"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in SERVICE_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, marker))
