"""The layers of the package import only downwards (README, "Architecture").

Every import of a ``finegrain`` module counts, at module top or inside a function, absolute or
relative. A module's layer is its first path component under ``src/finegrain`` (``config/files.py``
is in ``config``, ``cli/train.py`` in ``cli``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "finegrain"

ENTRY_POINTS = {"cli", "demo", "experiments"}
"""The top layer: these may import anything, and nothing below imports them."""

# package (or top-level module) -> the project packages it must never import
FORBIDDEN = {
    "config": {"data", "models", "inference", "retrieval", "tasks", "serve", "report", "metrics"},
    "data": {"models", "inference", "retrieval", "tasks", "serve", "report"},
    "models": {"data", "inference", "retrieval", "tasks", "serve", "report"},
    "metrics": {"inference", "retrieval", "tasks", "serve", "report"},
    "inference": {"retrieval", "tasks", "serve", "report"},
    "retrieval": {"tasks", "serve"},
    "report": {"tasks", "serve"},
    "serve": {"tasks", "cluster"},
    "cluster": {"tasks", "serve"},
}
for _layer_name in ("config", "data", "models", "metrics", "inference", "retrieval", "report"):
    FORBIDDEN[_layer_name].add("cluster")  # the cluster extra sits above the one-machine layers
FORBIDDEN = {layer: banned | ENTRY_POINTS for layer, banned in FORBIDDEN.items()}


def _layer(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The module a ``from ... import`` names, with a relative one (``from .files import x``) resolved
    against ``path``'s package (for a file outside ``src/finegrain``, as if it were at its top)."""
    if node.level == 0:
        return node.module or ""
    try:
        package = ["finegrain", *path.relative_to(SRC).parent.parts]
    except ValueError:
        package = ["finegrain"]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(path: Path) -> set[str]:
    """The second-level names (``finegrain.<name>``) a module imports anywhere in its body."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, path)
            names = [module] + ([f"{module}.{a.name}" for a in node.names] if module == "finegrain" else [])
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


def test_the_check_sees_relative_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from .tasks import engine\nfrom . import serve\n")
    assert _imported(module) == {"tasks", "serve"}


def test_packages_take_their_layer_from_their_folder():
    """``config`` and ``cli`` are packages: every module in them is in their layer."""
    config_modules = {p.relative_to(SRC).as_posix() for p in MODULES if _layer(p) == "config"}
    assert {"config/__init__.py", "config/schema.py", "config/losses.py", "config/files.py"} <= config_modules
    assert _layer(SRC / "cli" / "train.py") == "cli" and "cli" not in FORBIDDEN  # an entry point imports anything
    assert _layer(SRC / "runs.py") == "runs"
