"""The layers of the package import only downwards (README, "Architecture").

Every import of a ``finegrain`` module counts, at module top or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "finegrain"

# package (or top-level module) -> the project packages it must never import
FORBIDDEN = {
    "config": {"data", "models", "inference", "retrieval", "tasks", "serve", "report", "metrics"},
    "data": {"models", "inference", "retrieval", "tasks", "serve", "report"},
    "models": {"data", "inference", "retrieval", "tasks", "serve", "report"},
    "metrics": {"inference", "retrieval", "tasks", "serve", "report"},
    "inference": {"retrieval", "tasks", "serve", "report"},
    "retrieval": {"tasks", "serve"},
    "report": {"tasks", "serve"},
    "serve": {"tasks"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported(path: Path) -> set[str]:
    """The second-level names (``finegrain.<name>``) a module imports anywhere in its body."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "finegrain" else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "finegrain" and len(parts) > 1:
                out.add(parts[1])
    return out


MODULES = sorted(p for p in SRC.rglob("*.py") if _layer(p) in FORBIDDEN)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_a_higher_layer(path):
    bad = _imported(path) & FORBIDDEN[_layer(path)]
    assert not bad, f"{path.relative_to(SRC)} ({_layer(path)}) imports {sorted(bad)}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from finegrain.tasks.engine import fit\n    import finegrain.serve.app\n")
    assert _imported(module) == {"tasks", "serve"}
