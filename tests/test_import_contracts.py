"""The architecture contracts of .importlinter hold, and they can fail.

``lint-imports`` checks the layers, the pure-maths rule for ``adpm_dist.diffusion``, the
independence of the stages and the absence of import cycles. Each contract is also run
against a copy of the package with one offending import added, to show that the tool
catches it and names the import. torch.distributed is squashed into ``torch`` by the import
graph, so the rule that diffusion never touches it is checked here with the ast.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path, *contracts: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    args = [str(LINT), "--no-cache", "--no-logo"] + [a for c in contracts for a in ("--contract", c)]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_contracts_hold_in_the_repository():
    res = lint(ROOT)
    assert res.returncode == 0, f"lint-imports found broken contracts:\n{res.stdout}\n{res.stderr}"
    assert "0 broken" in res.stdout


# (contract id, module file to change, import to add, what the report must name)
VIOLATIONS = [
    ("layers", "models/registry.py", "import adpm_dist.train.ema", "adpm_dist.train.ema"),
    ("layers", "io/storage.py", "import adpm_dist.gamma", "adpm_dist.gamma"),
    ("pure-maths", "diffusion/schedule.py", "import fsspec", "fsspec"),
    ("pure-maths", "diffusion/forward.py", "import adpm_dist.io.dist", "adpm_dist.io.dist"),
    ("stages-independent", "stages/plan.py", "import adpm_dist.stages.demo", "adpm_dist.stages.demo"),
    ("acyclic", "diffusion/schedule.py", "from adpm_dist.diffusion import analytic",
     "adpm_dist.diffusion.analytic"),
]


@pytest.mark.parametrize(("contract", "rel", "line", "named"), VIOLATIONS)
def test_a_contract_names_the_offending_import(tmp_path, contract, rel, line, named):
    shutil.copytree(ROOT / "adpm_dist", tmp_path / "adpm_dist",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / ".importlinter", tmp_path / ".importlinter")
    target = tmp_path / "adpm_dist" / rel
    text = target.read_text().rstrip("\n") + "\n"
    lineno = text.count("\n") + 1
    target.write_text(f"{text}{line}  # injected\n")
    importer = "adpm_dist." + rel.removesuffix(".py").replace("/", ".")

    res = lint(tmp_path, contract, pythonpath=tmp_path)
    assert res.returncode != 0, res.stdout
    assert "BROKEN" in res.stdout, res.stdout
    if contract == "acyclic":  # names the package, then the sibling import to remove to break the cycle
        parent, a, b = importer.rsplit(".", 1)[0], importer.rsplit(".", 1)[1], named.rsplit(".", 1)[1]
        assert f"No cycles are allowed in {parent}." in res.stdout, res.stdout
        assert f".{a} -> .{b}" in res.stdout or f".{b} -> .{a}" in res.stdout, res.stdout
    else:
        assert importer in res.stdout and named in res.stdout, res.stdout
        assert f"l.{lineno}" in res.stdout, res.stdout


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch.distributed"):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_diffusion_never_touches_torch_distributed():
    bad = [f"{p.relative_to(ROOT)}:{n}: {name}"
           for p in sorted((ROOT / "adpm_dist" / "diffusion").rglob("*.py"))
           for n, name in _imports(p) if name == "torch.distributed" or name.startswith("torch.distributed.")]
    assert not bad, "adpm_dist.diffusion must not use torch.distributed:\n" + "\n".join(bad)


def test_the_distributed_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    for text in (
            "from torch import distributed as dist\n",
            "import torch\nr = torch.distributed.get_rank()\n"):
        probe.write_text(text)
        assert "torch.distributed" in [name for _, name in _imports(probe)], text


def test_the_architecture_diagram_is_drawn_from_the_current_code():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "import_graph.py"), "--check"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr + "\n(run: python tools/import_graph.py)"


def test_the_diagram_follows_a_new_import(tmp_path):
    from tests.tool_modules import load_tool

    graph = load_tool("import_graph")
    shutil.copytree(ROOT / "adpm_dist", tmp_path / "adpm_dist",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    before = graph.edges(tmp_path)
    assert ("stages", "io") in before and ("diffusion", "launch") not in before
    target = tmp_path / "adpm_dist" / "diffusion" / "schedule.py"
    target.write_text(target.read_text() + "\n\ndef _late():\n    from ..launch import cli  # noqa\n")
    after = graph.edges(tmp_path)
    assert after - before == {("diffusion", "launch")}
    assert "diffusion --> launch" in graph.mermaid(after)
