"""``finegrain list KIND``: the names a registry holds, one per line (a new registry is one row)."""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from finegrain.cli.common import console, err_console
from finegrain.errors import unknown_name

REGISTRIES: dict[str, tuple[str, str]] = {
    "backbones": ("finegrain.models.backbones", "BACKBONES"),
    "heads": ("finegrain.models.model", "HEADS"),
    "losses": ("finegrain.tasks.losses", "LOSSES"),
    "index-kinds": ("finegrain.retrieval.index", "INDEX_KINDS"),
    "stores": ("finegrain.gallery.backends", "STORES"),
}
"""``finegrain list`` name -> (module, registry attribute); imported when listed (torch, faiss: start-up cost)."""

NOTES = {"backbones": "also: every torchvision classification model, and timm:<name> for any timm model"}


def registry_names(kind: str) -> list[str]:
    """The names registered under ``kind`` (a key of :data:`REGISTRIES`); FinegrainError for another."""
    if kind not in REGISTRIES:
        raise unknown_name("registry", kind, list(REGISTRIES))
    module, attribute = REGISTRIES[kind]
    return list(getattr(importlib.import_module(module), attribute).names())


def list_names(kind: Annotated[str, typer.Argument(help=f"One of: {', '.join(REGISTRIES)}.")]) -> None:
    """List the names of one registry (backbones, heads, losses, index kinds, gallery stores)."""
    for name in registry_names(kind):
        console.print(name, highlight=False)
    if kind in NOTES:  # on stderr: stdout stays one name a line for scripts
        err_console.print(NOTES[kind], highlight=False, style="dim")
