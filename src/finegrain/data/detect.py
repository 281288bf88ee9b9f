"""The dataset format registry: detect a folder's format and open it.

Detection order (first match wins): a ``.csv`` file → ``csv``; ``wnids.txt`` +
``train/`` or ``val/`` → ``tiny_imagenet``; a known Stanford Cars ``.mat`` file
within 4 levels → ``stanford_cars``; sub-folders holding images →
``image_folder``. A gallery also takes a folder no format fits: the images directly
inside it, unlabelled (:func:`open_gallery_folder`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from finegrain.data.folder import looks_like_image_folder, read_csv, read_flat_folder, read_image_folder
from finegrain.data.records import ImageCollection
from finegrain.data.stanford_cars import looks_like_stanford_cars, read_stanford_cars
from finegrain.data.tiny_imagenet import looks_like_tiny_imagenet, read_tiny_imagenet
from finegrain.errors import DataError, unknown_name

FORMATS = ("stanford_cars", "tiny_imagenet", "image_folder", "csv")

READERS: dict[str, Callable[[Path], ImageCollection]] = {
    "stanford_cars": read_stanford_cars,
    "tiny_imagenet": read_tiny_imagenet,
    "image_folder": read_image_folder,
    "csv": read_csv,
}

# What each detector looks for, for the "cannot detect" message.
LOOKED_FOR = {
    "tiny_imagenet": "wnids.txt and a train/ or val/ folder at {root}",
    "stanford_cars": "a Stanford Cars .mat file (cars_meta.mat, cars_train_annos.mat, "
    "cars_test_annos_withlabels*.mat or cars_annos.mat) within 4 levels under {root}",
    "image_folder": "class sub-folders holding image files (jpg, png, ...) in {root} or {root}/train",
    "csv": "a .csv file given as the path (columns path,label[,split])",
}


def _existing(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist")
    return root


def _detected(root: Path) -> str | None:
    """The format of the folder ``root``, or None when none fits."""
    if looks_like_tiny_imagenet(root):
        return "tiny_imagenet"
    if looks_like_stanford_cars(root):
        return "stanford_cars"
    if looks_like_image_folder(root):
        return "image_folder"
    return None


def detect_format(root: str | Path) -> str:
    """Return the name (one of :data:`FORMATS`) of the dataset format at ``root``."""
    root = _existing(root)
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "csv"
        raise DataError(
            f"{root} is a file but not a .csv; a dataset is a folder or a CSV list. "
            f"Looked for: " + "; ".join(f"{k}: {v.format(root=root)}" for k, v in LOOKED_FOR.items())
        )
    found = _detected(root)
    if found is not None:
        return found
    raise DataError(
        f"cannot tell the dataset format of {root}. Looked for: "
        + "; ".join(f"{k}: {v.format(root=root)}" for k, v in LOOKED_FOR.items())
    )


def open_collection(root: str | Path, format: str = "auto") -> ImageCollection:
    """Read the dataset at ``root`` with the named format (``auto``: detect it)."""
    if format != "auto" and format not in READERS:
        raise unknown_name("dataset format", format, ("auto", *FORMATS))
    root = _existing(root)
    name = detect_format(root) if format == "auto" else format
    return READERS[name](root)


def open_gallery_folder(root: str | Path) -> ImageCollection:
    """Images to index or add to a gallery: a dataset of any format (labelled by it) or, for a folder
    no format fits, the image files directly inside it, unlabelled (:func:`read_flat_folder`)."""
    root = _existing(root)
    if root.is_dir() and _detected(root) is None:
        return read_flat_folder(root)
    return open_collection(root)
