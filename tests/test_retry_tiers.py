"""The test tiers: `make test-fast` deselects the markers s3, slurm and slow, so they must be right.

(Test tiers rather than retries; the file name carries the prefix of the storage/retry work
that added both.) s3 and slurm follow from the fixtures a test uses (tests/conftest.py); a test
that starts a service without them must carry the marker by hand, which a source scan checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# What starting a service looks like in a test, and the marker it then needs.
SERVICE_STARTERS = {"s3_local.sh": "s3", "local-cluster.sh": "slurm"}
SERVICE_FIXTURES = {"s3_server": "s3", "s3_bucket": "s3", "slurm_cluster": "slurm"}


def test_service_markers_follow_the_fixtures(pytester):
    pytester.makeini("[pytest]\nmarkers =\n    s3: x\n    slurm: x\n")
    pytester.makeconftest(
        """
import pytest
from tests.conftest import pytest_collection_modifyitems  # the hook under test

@pytest.fixture
def s3_server():
    return "server"

@pytest.fixture
def s3_bucket(s3_server):
    return "bucket"

@pytest.fixture
def slurm_cluster():
    return "cluster"
"""
    )
    pytester.makepyfile(
        """
import pytest

def test_plain(): pass
def test_direct(s3_server): pass
def test_through_another_fixture(s3_bucket): pass
@pytest.mark.usefixtures("slurm_cluster")
def test_usefixtures(): pass
"""
    )
    fast = pytester.runpytest("-m", "not s3 and not slurm", "-q")
    fast.assert_outcomes(passed=1, deselected=3)
    s3 = pytester.runpytest("-m", "s3", "-q")
    s3.assert_outcomes(passed=2, deselected=2)


def _marks(node: ast.FunctionDef | ast.Module) -> str:
    decorators = node.decorator_list if isinstance(node, ast.FunctionDef) else [
        stmt.value for stmt in node.body
        if isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in stmt.targets)
    ]
    return " ".join(ast.unparse(d) for d in decorators)


def test_tests_that_start_a_service_themselves_are_marked():
    unmarked = []
    for path in sorted(TESTS.glob("test_*.py")):
        module = ast.parse(path.read_text())
        module_marks = _marks(module)
        for node in module.body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            params = {a.arg for a in node.args.args}
            source = ast.unparse(node)
            for starter, marker in SERVICE_STARTERS.items():
                via_fixture = any(SERVICE_FIXTURES.get(p) == marker for p in params)
                marked = f"mark.{marker}" in _marks(node) + module_marks
                if starter in source and not (via_fixture or marked):
                    unmarked.append(f"{path.name}::{node.name} (starts {starter}: mark it {marker})")
    assert unmarked == []
