"""House rules for the package (docs/architecture.md): small modules and functions, docstrings
that point only at files which exist, and every third-party import declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adpm_dist"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MODULES = sorted(PACKAGE.rglob("*.py"))

# A file named in a docstring: a path under a top-level folder, or any Markdown file.
PATHLIKE = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w.*-]+\.\w+|[\w.-]+\.md)\b")
PLACEHOLDER = re.compile(r"\b[A-Z]{2,}\b")  # configs/NAME.yaml names a family of files


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_modules_are_at_most_400_lines():
    long = {_rel(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them): {long}"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_functions_are_at_most_60_lines():
    long = [f"{_rel(p)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for p in MODULES for f in _functions(ast.parse(p.read_text()))
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def _docstrings(tree: ast.Module):
    yield "<module>", ast.get_docstring(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, ast.get_docstring(node)


def referenced_files(text: str) -> list[str]:
    """Repository files a docstring points at: paths under a top-level folder, and *.md files."""
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} | {"shared"}
    refs = []
    for ref in PATHLIKE.findall(text):
        if ref.split("/", 1)[0] in top or ("/" not in ref and ref.endswith(".md")):
            refs.append(ref)
    return refs


def _exists(ref: str) -> bool:
    pattern = PLACEHOLDER.sub("*", ref) if "/" in ref else ref
    if "*" in pattern:
        return any(ROOT.glob(pattern))
    return (ROOT / ref).exists() or (ROOT / "docs" / ref).exists()


def test_docstrings_point_only_at_files_in_the_repository():
    missing = [f"{_rel(p)} ({where}): {ref}"
               for p in MODULES for where, doc in _docstrings(ast.parse(p.read_text())) if doc
               for ref in referenced_files(doc) if not _exists(ref)]
    assert not missing, "docstrings name files that are not in the repository:\n" + "\n".join(missing)


def test_the_reference_check_can_fail():
    refs = referenced_files("see DESIGN.md and shared/ENVIRONMENT.md, docs/architecture.md, "
                            "configs/NAME.yaml; writes OUT/nll.md and latest.json")
    assert refs == ["DESIGN.md", "shared/ENVIRONMENT.md", "docs/architecture.md", "configs/NAME.yaml"]
    assert [_exists(r) for r in refs] == [False, False, True, True]


def _third_party_imports(paths: list[Path], local: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, f"{_rel(p)}:{node.lineno}")
    return found


def _declared() -> set[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_every_third_party_import_is_declared():
    tools = sorted((ROOT / "tools").glob("*.py"))
    local = {"adpm_dist"} | {p.stem for p in tools}
    dists = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared = []
    for module, where in sorted(_third_party_imports(MODULES + tools, local).items()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if not names & declared:
            undeclared.append(f"{module} ({where}; distribution {sorted(names) or 'not installed'})")
    assert not undeclared, "imports missing from pyproject.toml:\n" + "\n".join(undeclared)
