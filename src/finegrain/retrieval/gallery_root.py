"""The folder a gallery's images lie in, recorded when its index is built, so that a service
hands out only files inside it: an index's ``paths.json`` (a stranger's run, edited by hand)
cannot point an image id at another file the server can read."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from finegrain.errors import FinegrainError


def common_root(paths: Sequence[str]) -> Path:
    """The deepest folder that holds every one of ``paths`` (resolved: symlinks followed)."""
    if not paths:
        raise FinegrainError("a gallery without images has no folder")
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))


def too_wide(root: Path) -> bool:
    """A file system root, the home folder or a folder above it: too much to hand out."""
    home = Path.home().resolve()
    return root == Path(root.anchor) or root == home or root in home.parents


def served_root(recorded: object, paths: Sequence[str]) -> Path:
    """The gallery folder of an index: the one recorded at build time (else the folder common to
    its paths); :class:`FinegrainError` when it is too wide a folder to serve images from."""
    root = Path(recorded).resolve() if isinstance(recorded, str) and recorded else common_root(paths)
    if too_wide(root):
        raise FinegrainError(
            f"the gallery images of this index lie in {root}, too wide a folder to serve "
            "images from (rebuild the index with `finegrain index RUN` from an image folder)"
        )
    return root


def inside(root: Path, path: str) -> bool:
    """Whether ``path`` (symlinks followed) lies inside ``root``."""
    return Path(path).resolve().is_relative_to(root)
