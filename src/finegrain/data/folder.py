"""Users' own data: class-per-folder image trees and CSV lists.

Image folder rules (:func:`read_image_folder`):

* ``root/<class>/**/<image>``: one split, ``train`` (``missing["test"]`` says so).
* ``root/train/<class>/...`` with ``root/test/<class>/...``: two splits. When there
  is no ``test/`` folder, the first of ``val/``, ``valid/``, ``validation/`` is the
  test split (with a note); other top-level folders are ignored (with a note).
* Classes are the folder names, sorted; the class sets of train and test are
  merged. Image files are recognised by extension (:data:`IMAGE_EXTENSIONS`,
  any case); other files are ignored and counted in ``notes``. Hidden files and
  folders (``.name``) are skipped.

A flat folder (:func:`read_flat_folder`, for galleries only): image files directly inside
``root`` and none in any sub-folder; its images have no class (:data:`UNLABELLED`). Any
sub-folder holding images makes the folder a class-per-folder tree (its loose images are then
ignored, with a note).

CSV (:func:`read_csv`): a header with columns ``path,label`` and optionally
``split``; paths are absolute or relative to the CSV's folder; labels are class
names (sorted to give label indices); split is ``train`` or ``test`` (empty =
``train``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from PIL import Image

from finegrain.data.records import UNLABELLED, ImageCollection, ImageRecord
from finegrain.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
TEST_DIR_NAMES = ("test", "val", "valid", "validation")


def is_image_name(path: str | Path) -> bool:
    """True when the file name has an image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- writing


def write_image_folder(
    root: Path,
    class_names: list[str],
    splits: dict[str, list[tuple[Image.Image, int]]],
) -> Path:
    """Write ``root/<split>/<class_name>/<n>.png`` (or ``root/<class_name>/<n>.png``
    when the only split is ``"all"``); labels are 0-based into ``class_names``.
    Returns ``root``."""
    root = Path(root)
    flat = set(splits) == {"all"}
    for split, samples in splits.items():
        base = root if flat else root / split
        for n, (im, label) in enumerate(samples):
            folder = base / class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            im.save(folder / f"{n}.png", format="PNG")
    return root


# --------------------------------------------------------------------------- reading image folders


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_class_dir(folder: Path) -> tuple[list[Path], int]:
    """Image files under ``folder`` (recursively, sorted) and the count of other files."""
    images, others = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith("."):
                continue
            if is_image_name(f):
                images.append(Path(dirpath) / f)
            else:
                others += 1
    return sorted(images), others


def _has_class_dirs(folder: Path) -> bool:
    """True when ``folder`` has a sub-folder holding at least one image file."""
    for d in _visible_dirs(folder):
        for _, _, files in os.walk(d):
            if any(is_image_name(f) for f in files):
                return True
    return False


def looks_like_image_folder(root: Path) -> bool:
    """Cheap detection test: some sub-folder of ``root`` holds image files."""
    root = Path(root)
    return root.is_dir() and _has_class_dirs(root)


def read_image_folder(root: Path) -> ImageCollection:
    """Read a class-per-folder tree (see the module docstring for the rules)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a folder")
    notes: list[str] = []
    missing: dict[str, str] = {}
    split_dirs: dict[str, Path] = {}
    train = root / "train"
    if train.is_dir() and _has_class_dirs(train):
        split_dirs["train"] = train
        test_dir = next((root / n for n in TEST_DIR_NAMES if (root / n).is_dir()), None)
        if test_dir is not None:
            split_dirs["test"] = test_dir
            if test_dir.name != "test":
                notes.append(f"{test_dir.name}/ used as the test split")
        else:
            missing["test"] = f"no test split: looked for {', '.join(f'{root / n}/' for n in TEST_DIR_NAMES)}"
        ignored = [d.name for d in _visible_dirs(root) if d not in split_dirs.values()]
        if ignored:
            notes.append(f"folders ignored beside train/ and test/: {', '.join(ignored)}")
    else:
        split_dirs["train"] = root
        missing["test"] = (
            f"no test split: {root} holds class folders directly (one split, used as train); "
            f"put images in {root}/train/<class>/ and {root}/test/<class>/ for an official test split"
        )
    per_split: dict[str, dict[str, list[Path]]] = {}
    others = 0
    for split, d in split_dirs.items():
        classes: dict[str, list[Path]] = {}
        for cdir in _visible_dirs(d):
            images, n_other = _scan_class_dir(cdir)
            others += n_other
            if images:
                classes[cdir.name] = images
            else:
                notes.append(f"{cdir} has no image files (ignored)")
        loose = [p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")]
        loose_images = sum(1 for p in loose if is_image_name(p))
        others += len(loose) - loose_images
        if loose_images:
            notes.append(f"{loose_images} images directly in {d} ignored: only those in its class sub-folders are read")
        per_split[split] = classes
    names = sorted({c for classes in per_split.values() for c in classes})
    if not names:
        raise DataError(f"{root}: no image files found in class sub-folders (extensions {', '.join(IMAGE_EXTENSIONS)})")
    index = {c: i for i, c in enumerate(names)}
    splits = {
        split: [ImageRecord(p, index[c]) for c in sorted(classes) for p in classes[c]]
        for split, classes in per_split.items()
        if classes
    }
    for split in split_dirs:
        if split not in splits:
            missing[split] = f"no images in class sub-folders of {split_dirs[split]}"
    if others:
        notes.append(f"{others} non-image files ignored (not {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)})")
    return ImageCollection("image_folder", root, names, splits, missing, notes)


def read_flat_folder(root: Path) -> ImageCollection:
    """The image files directly inside ``root``, unlabelled (:data:`UNLABELLED`), as one split ``all``:
    a gallery folder without class sub-folders. One-line :class:`DataError` when it holds no image."""
    root = Path(root).expanduser().resolve()
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if is_image_name(p)]
    if not images:
        held = f"{len(files)} file(s) but no image" if files else "no image"
        raise DataError(
            f"{root} holds {held}: put image files ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in it, "
            "or in class sub-folders to label them"
        )
    notes = [f"{len(files) - len(images)} non-image files ignored"] if len(files) > len(images) else []
    records = [ImageRecord(p, UNLABELLED) for p in images]
    return ImageCollection("flat_folder", root, [], {"all": records}, {}, notes)


# --------------------------------------------------------------------------- reading CSV


def read_csv(path: Path) -> ImageCollection:
    """Read a CSV list ``path,label[,split]`` (header required) into an ImageCollection.

    Rows whose image file does not exist are dropped and counted in ``notes``.
    Raises :class:`DataError` naming the file and line for a malformed row.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"CSV file {path} not found")
    base = path.parent
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from None
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    if "path" not in header or "label" not in header:
        raise DataError(f"{path}, line 1: expected a header with columns path,label[,split]; got {header}")
    col = {h: i for i, h in enumerate(header)}
    rows: list[tuple[str, Path, str]] = []
    for line, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: expected {len(header)} fields ({','.join(header)}), got {len(row)}")
        file, label = row[col["path"]].strip(), row[col["label"]].strip()
        split = row[col["split"]].strip().lower() if "split" in col else ""
        split = split or "train"
        if not file or not label:
            raise DataError(f"{path}, line {line}: empty path or label")
        if split not in ("train", "test"):
            raise DataError(f"{path}, line {line}: split '{split}' is not 'train' or 'test'")
        p = Path(file).expanduser()
        rows.append((split, p if p.is_absolute() else base / p, label))
    if not rows:
        raise DataError(f"{path}: no rows after the header")
    names = sorted({r[2] for r in rows})
    index = {c: i for i, c in enumerate(names)}
    splits: dict[str, list[ImageRecord]] = {}
    absent = 0
    for split, p, label in rows:
        if not p.is_file():
            absent += 1
            continue
        splits.setdefault(split, []).append(ImageRecord(p, index[label]))
    notes = [f"{absent} listed images not found on disk (dropped), paths relative to {base}"] if absent else []
    missing = {
        s: f"no rows of {path} with split '{s}' (and an existing file)" for s in ("train", "test") if s not in splits
    }
    if not splits:
        raise DataError(f"{path}: none of the {len(rows)} listed image files exists (paths relative to {base})")
    splits = {s: splits[s] for s in ("train", "test") if s in splits}
    return ImageCollection("csv", path, names, splits, missing, notes)
