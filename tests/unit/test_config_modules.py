"""The configuration's modules: each imports only those below it, and ``echod.config`` is a
facade that defines nothing of its own."""

from __future__ import annotations

import ast
from pathlib import Path

from echod import config

ROOT = Path(__file__).resolve().parents[2]
#: Lowest first: a module may import those before it, never one after it.
LAYERS = (
    "echod.kinds",
    "echod.settings",
    "echod.configparse",
    "echod.configfile",
    "echod.configdump",
    "echod.config",
)


def _source(module: str) -> ast.Module:
    path = ROOT / (module.replace(".", "/") + ".py")
    return ast.parse(path.read_text(encoding="utf-8"))


def _imported(tree: ast.Module) -> set[str]:
    """The modules a module imports, ``from echod import x`` counted as ``echod.x``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_each_module_imports_only_lower_ones() -> None:
    """No configuration module imports one above it, so there is no import cycle."""
    upward = [
        f"{module} imports {higher}"
        for rank, module in enumerate(LAYERS)
        for higher in LAYERS[rank:]
        if higher in _imported(_source(module))
    ]
    assert upward == []


def test_the_facade_only_re_exports() -> None:
    """echod.config holds imports and ``__all__`` only, and exports every name it imports."""
    tree = _source("echod.config")
    body = [node for node in tree.body if not isinstance(node, ast.ImportFrom)]
    assert [type(node).__name__ for node in body] == ["Expr", "Assign"]  # docstring, __all__
    imported = {
        alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
        for alias in node.names
    }
    assert sorted(config.__all__) == sorted(imported)
