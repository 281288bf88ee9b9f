"""The layers of the package import only downwards (README, "Architecture").

Every import of a ``finegrain`` module counts, at module top or inside a function, absolute or
relative. A module's layer is its first path component under ``src/finegrain`` (``config/files.py``
is in ``config``, ``cli/train.py`` in ``cli``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "finegrain"

LAYERS: list[set[str]] = [
    {"__init__", "errors"},
    {"registry", "faiss_import", "progress", "machine"},
    {"config"},
    {"runs"},
    {"data", "models", "metrics"},
    {"inference"},
    {"retrieval"},
    {"gallery", "cluster"},
    {"report", "serve"},
    {"tasks"},
    {"cli", "demo", "experiments", "__main__"},
]
"""Every top-level module and package of ``src/finegrain``, bottom layer first. A module may import its own
package and the layers below its own, never a layer above nor another package of its own layer. The last
row is the entry points: they may import anything, and nothing below imports them."""

RANK = {name: i for i, row in enumerate(LAYERS) for name in row}
ENTRY_POINTS = LAYERS[-1]
FORBIDDEN = {
    name: set() if name in ENTRY_POINTS else {other for other in RANK if other != name and RANK[other] >= RANK[name]}
    for name in RANK
}


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


MODULES = sorted(SRC.rglob("*.py"))


def test_every_module_has_a_layer():
    """A new module or package must be given its row in LAYERS (else the layer check would skip it)."""
    missing = sorted({_layer(p) for p in MODULES} - set(RANK))
    assert not missing, f"no row in tests/test_layers.py LAYERS for: {missing}"


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
    assert _layer(SRC / "cli" / "train.py") == "cli" and not FORBIDDEN["cli"]  # an entry point imports anything
    assert _layer(SRC / "runs.py") == "runs"


def test_the_rows_forbid_upward_and_sideways_imports():
    assert "models" in FORBIDDEN["machine"] and "data" in FORBIDDEN["models"] and "models" in FORBIDDEN["data"]
    assert "errors" not in FORBIDDEN["machine"] and "data" not in FORBIDDEN["inference"]


# ---------------------------------------------------------------- imports inside functions
UNEXPLAINED_LOCAL_IMPORTS: dict[str, int] = {}
"""Imports inside functions that do not say why (file -> how many): none are left, so any new one fails.
An import belongs inside a function only for an optional dependency (torch, faiss, onnxruntime...) or a
measured start-up cost, and then says which in a comment on its line or the line above."""


_IMPORT_LINE = re.compile(r"\s*(from \S+ )?import ")


def _unexplained_local_imports(path: Path) -> int:
    lines = path.read_text().splitlines()
    found = set()
    for fn in ast.walk(ast.parse("\n".join(lines), str(path))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    above = node.lineno - 2  # a comment above a block of imports speaks for the block
                    while above >= 0 and _IMPORT_LINE.match(lines[above]) and "#" not in lines[above]:
                        above -= 1
                    if "#" not in lines[node.lineno - 1] and not lines[above].strip().startswith("#"):
                        found.add(node.lineno)
    return len(found)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_inside_functions_say_why(path):
    rel = path.relative_to(SRC).as_posix()
    count, allowed = _unexplained_local_imports(path), UNEXPLAINED_LOCAL_IMPORTS.get(rel, 0)
    assert count <= allowed, (
        f"{rel}: {count - allowed} new import(s) inside a function without a comment saying "
        "which optional dependency or start-up cost keeps it there"
    )


def test_the_local_import_check_sees_a_missing_reason(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    import torch  # optional: the serve extra has no torch\n"
        "    # start-up cost\n    import faiss\n    import json\n\n    import numpy\n"
    )
    assert _unexplained_local_imports(module) == 1  # json is in the commented block, numpy is not
