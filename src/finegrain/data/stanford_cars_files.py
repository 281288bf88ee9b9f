"""Finding a Stanford Cars copy's files: every ``.mat`` within the search depth sorted into its
role (class names, train, labelled or unlabelled test annotations, the all-images file) by its
content and name, and the ``cars_<split>`` image folders. :mod:`finegrain.data.stanford_cars`
reads the layouts from what is found here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io as sio

from finegrain.errors import DataError

SEARCH_DEPTH = 4
# Record counts of the genuine devkit files, used when a file name says neither train nor test.
OFFICIAL_TRAIN_COUNT = 8144
OFFICIAL_TEST_COUNT = 8041
KNOWN_MAT_NAMES = (
    "cars_meta.mat",
    "cars_train_annos.mat",
    "cars_test_annos.mat",
    "cars_test_annos_withlabels.mat",
    "cars_annos.mat",
)
BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


@dataclass
class Found:
    """What the search under the root turned up, by role."""

    meta: list[tuple[Path, list[str]]] = field(default_factory=list)
    train: list[tuple[Path, np.ndarray]] = field(default_factory=list)
    test_labeled: list[tuple[Path, np.ndarray]] = field(default_factory=list)
    test_unlabeled: list[tuple[Path, np.ndarray]] = field(default_factory=list)
    all_images: list[tuple[Path, np.ndarray, list[str]]] = field(default_factory=list)
    unused: list[Path] = field(default_factory=list)


def walk_dirs(root: Path, depth: int = SEARCH_DEPTH):
    """Yield ``(dirpath, dirnames, filenames)`` down to ``depth`` levels below root, sorted."""
    root_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        if len(here.parts) - root_depth >= depth:
            dirnames[:] = []
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield here, dirnames, sorted(filenames)


def find_mat_files(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """Every ``*.mat`` file within ``depth`` folders of ``root``, shallowest first."""
    out = [d / f for d, _, files in walk_dirs(root, depth) for f in files if f.lower().endswith(".mat")]
    return sorted(out, key=lambda p: (len(p.parts), str(p)))


def is_known_name(path: Path) -> bool:
    """Whether the file has one of the devkit's or the all-images layout's .mat names."""
    name = path.name.lower()
    return name in KNOWN_MAT_NAMES or name.startswith("cars_test_annos_withlabels")


def load_mat(path: Path) -> dict:
    """The variables of a .mat file; DataError when scipy cannot read it."""
    try:
        return sio.loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, OSError, MatReadError...
        raise DataError(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e})") from None


def classify_mat(path: Path, found: Found) -> None:
    """Put one .mat file into its role; raise DataError for a known name that holds the wrong thing."""
    known = is_known_name(path)
    try:
        mat = load_mat(path)
    except DataError:
        if known:
            raise
        found.unused.append(path)
        return
    ann = mat.get("annotations")
    fields = set(ann.dtype.names or ()) if isinstance(ann, np.ndarray) else set()
    if ann is not None and {"relative_im_path", "class", "test"} <= fields:
        found.all_images.append((path, ann.ravel(), class_names_of(mat, path) if "class_names" in mat else []))
        return
    if ann is None and "class_names" in mat:
        found.meta.append((path, class_names_of(mat, path)))
        return
    if ann is not None and {"fname", *BOX_FIELDS} <= fields:
        recs = ann.ravel()
        name = path.name.lower()
        if "class" not in fields:
            found.test_unlabeled.append((path, recs))
        elif "train" in name or ("test" not in name and recs.size == OFFICIAL_TRAIN_COUNT):
            found.train.append((path, recs))
        elif "test" in name or recs.size == OFFICIAL_TEST_COUNT:
            found.test_labeled.append((path, recs))
        else:
            found.unused.append(path)
        return
    if known:
        want = (
            "a 'class_names' variable"
            if "meta" in path.name.lower()
            else ("an 'annotations' struct array with fields " + ", ".join([*BOX_FIELDS, "class", "fname"]))
        )
        have = sorted(k for k in mat if not k.startswith("__"))
        got = f"variables {have}" + (f", annotation fields {sorted(fields)}" if fields else "")
        raise DataError(f"{path}: expected {want}; found {got}")
    found.unused.append(path)


def class_names_of(mat: dict, path: Path) -> list[str]:
    """The ``class_names`` variable as strings."""
    try:
        return [mat_text(v) for v in np.asarray(mat["class_names"]).ravel()]
    except Exception as e:
        raise DataError(f"{path}: 'class_names' is not a list of strings ({e})") from None


def mat_text(v) -> str:
    """A MATLAB string cell as str (empty when empty)."""
    v = np.asarray(v)
    return str(v.ravel()[0]) if v.size else ""


def mat_int_value(v) -> int:
    """A MATLAB scalar as int."""
    return int(np.asarray(v).ravel()[0])


def find_files(root: Path) -> Found:
    """Every .mat file under ``root``, sorted into its role."""
    found = Found()
    for path in find_mat_files(root):
        classify_mat(path, found)
    return found


def image_dirs(root: Path, name: str) -> list[Path]:
    """Folders called ``name`` within the search depth, shallowest first."""
    return [d / n for d, dirs, _ in walk_dirs(root) for n in dirs if n == name]


def pick_image_dir(root: Path, split: str, fnames: list[str]) -> Path | None:
    """The ``cars_<split>`` folder (at any nesting) holding the most of ``fnames``."""
    best, best_hits = None, 0
    sample = fnames[: min(len(fnames), 50)]
    for d in image_dirs(root, f"cars_{split}"):
        hits = sum((d / f).is_file() for f in sample)
        if hits > best_hits:
            best, best_hits = d, hits
    return best
