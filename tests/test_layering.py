"""Imports go one way: native <- formats <- kernels <- models <- calibrate <- quantize <- cli (DESIGN.md)."""

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


def test_imports_go_one_way() -> None:
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        own = _layer(".".join(rel.parts if rel.name != "__init__" else rel.parts[:-1]))
        if own is None or rel.parts == ("lowbit", "__init__"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                dep = _layer(name)
                if dep is not None and dep > own:
                    bad.append(f"{rel}: imports {name}")
    assert not bad, "\n".join(bad)
