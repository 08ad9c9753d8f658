#!/usr/bin/env python
"""Draw adpm_dist's layer picture from the code: which subpackage imports which.

Walks every module of the package with ``ast`` (imports inside functions included), folds
modules into their first-level unit (``stages/``, ``io/``, ``gamma``, ...) and writes a
mermaid graph between the markers in docs/architecture.md.

    python tools/import_graph.py            # rewrite the diagram in docs/architecture.md
    python tools/import_graph.py --check    # exit 1 if the committed diagram is out of date
    python tools/import_graph.py --print    # print the mermaid block only
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "adpm_dist"
DOC = ROOT / "docs" / "architecture.md"
BEGIN = "<!-- import-graph:begin (tools/import_graph.py writes this block) -->"
END = "<!-- import-graph:end -->"
SHIMS = {"estimate", "sample", "evaluate"}  # adpm_dist/{estimate,sample,evaluate}.py entry points
# Top to bottom, as in .importlinter; a unit not listed here is drawn last.
ORDER = ["entry", "launch", "stages", "integrations", "train", "gamma", "models", "io", "diffusion",
         "errors"]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str, units: set[str]) -> str | None:
    """The first-level unit of a module inside the package; None for the root and its attributes."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) == 1 or parts[1] not in units:
        return None
    return "entry" if parts[1] in SHIMS else parts[1]


def imported_modules(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Absolute names of everything a module imports (``from a import b`` yields a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def edges(root: Path = ROOT) -> set[tuple[str, str]]:
    pkg_dir = root / PACKAGE
    units = {p.parent.name for p in pkg_dir.glob("*/__init__.py")}
    units |= {p.stem for p in pkg_dir.glob("*.py") if p.stem != "__init__"}
    out: set[tuple[str, str]] = set()
    for path in sorted(pkg_dir.rglob("*.py")):
        module = module_name(path, root)
        src = unit_of(module, units)
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in imported_modules(tree, module, path.name == "__init__.py"):
            dst = unit_of(name, units)
            if src and dst and src != dst:
                out.add((src, dst))
    return out


def _label(unit: str) -> str:
    if unit == "entry":
        return "estimate / sample / evaluate shims"
    return f"{unit}/" if (ROOT / PACKAGE / unit).is_dir() else unit


def mermaid(found: set[tuple[str, str]]) -> str:
    rank = {u: i for i, u in enumerate(ORDER)}
    units = sorted({u for e in found for u in e}, key=lambda u: (rank.get(u, len(ORDER)), u))
    lines = ["```mermaid", "graph TD"]
    lines += [f"    {u}[\"{_label(u)}\"]" for u in units]
    for a, b in sorted(found, key=lambda e: (rank.get(e[0], len(ORDER)), rank.get(e[1], len(ORDER)), e)):
        lines.append(f"    {a} --> {b}")
    lines.append("```")
    return "\n".join(lines)


def render(doc_text: str, block: str) -> str:
    if BEGIN not in doc_text or END not in doc_text:
        raise SystemExit(f"{DOC}: markers {BEGIN!r} and {END!r} not found")
    head, rest = doc_text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if docs/architecture.md is stale")
    mode.add_argument("--print", action="store_true", help="print the mermaid block")
    args = p.parse_args(argv)
    block = mermaid(edges())
    if args.print:
        print(block)
        return 0
    old = DOC.read_text()
    new = render(old, block)
    if args.check:
        if new != old:
            print(f"{DOC.relative_to(ROOT)}: the import diagram is out of date; run "
                  "python tools/import_graph.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
