"""The package's shape, checked rather than described: no import cycle, no late import that
could hide one, no module over the size a reader takes in at once. The layering itself
(faces -> report -> remedies -> judge | measure -> data) is import-linter's contract in
pyproject.toml, which CI runs (`lint-imports`)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parent.parent / "gradwatch"
MAX_LINES = 450  # the limit ../shared/tools/arch_check.py checks; the aim is about 400


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for module in sorted(graph.modules):
        if module not in index:
            strong(module)
    return found


def test_no_import_cycle_in_the_package() -> None:
    # grimp reads every import statement, those inside functions included: a late import
    # that hides a cycle is still a cycle.
    graph = grimp.build_graph("gradwatch")
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def _late_imports(source: str) -> list[int]:
    """Lines of imports of gradwatch modules made inside a function."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (
                        inner.level or (inner.module or "").startswith("gradwatch")):
                    lines.append(inner.lineno)
                elif isinstance(inner, ast.Import) and any(
                        a.name.startswith("gradwatch") for a in inner.names):
                    lines.append(inner.lineno)
    return lines


def test_no_module_imports_gradwatch_inside_a_function() -> None:
    late = {str(p.relative_to(PACKAGE)): lines for p in sorted(PACKAGE.rglob("*.py"))
            if (lines := _late_imports(p.read_text(encoding="utf-8")))}
    assert late == {}
    assert _late_imports("def f():\n    from .x import y\n") == [2]


def test_no_module_is_longer_than_a_reader_takes_in() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := p.read_text(encoding="utf-8").count("\n") + 1) > MAX_LINES}
    assert long == {}
