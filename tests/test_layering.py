"""Imports go one way: native <- formats <- kernels <- models <- calibrate <- quantize <- cli (DESIGN.md),
and inside a package too: no module imports, directly or through others, a module that imports it.

Every import statement counts, also those under ``if TYPE_CHECKING:`` and inside functions (a lazy import
is still a dependency). The package root ``lowbit`` is left out: it only re-exports, lazily.
"""

from __future__ import annotations

import ast
from pathlib import Path

LAYERS = ["errors", "native", "formats", "kernels", "models", "calibrate", "quantize", "cli"]
ROOT = Path(__file__).resolve().parents[1] / "lowbit"


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "lowbit":
        return None
    if len(parts) == 1:
        return 0  # the package root only re-exports lazily
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under ``root`` (packages by __init__)."""
    found = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        found[".".join(rel.parts if rel.name != "__init__" else rel.parts[:-1])] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that the file at ``path`` imports (``from a import b`` names module a.b if there is one)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            deps.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names)
    return {d for d in deps if d in known}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, without the package root (see the module docstring)."""
    modules = _modules(root)
    top = root.name
    return {m: _imports(p, set(modules)) - {top} for m, p in modules.items() if m != top}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each an import cycle), sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_imports_go_one_way() -> None:
    bad = []
    for module, deps in import_graph().items():
        own = _layer(module)
        if own is None:
            continue
        bad += [f"{module}: imports {dep}" for dep in sorted(deps) if (_layer(dep) or 0) > own]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_cycle_detection_finds_a_cycle(tmp_path: Path) -> None:
    """The checker itself: a three-module cycle inside a package, a TYPE_CHECKING import and a lazy one."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.c import X\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    import pkg.sub.a\n")
    (pkg / "sub" / "d.py").write_text("from pkg.sub import a\n")
    assert cycles(import_graph(pkg)) == [["pkg.sub.a", "pkg.sub.b", "pkg.sub.c"]]
