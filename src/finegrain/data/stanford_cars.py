"""Stanford Cars (Cars196): reading and writing its three common layouts.

Layouts (auto-detected by :func:`read_stanford_cars`):

``devkit``  (torchvision's ``StanfordCars``)::

    devkit/cars_meta.mat  devkit/cars_train_annos.mat  devkit/cars_test_annos.mat
    cars_test_annos_withlabels.mat  cars_train/00001.jpg ...  cars_test/00001.jpg ...

``all_images``  (metric-learning papers)::

    cars_annos.mat   car_ims/000001.jpg ...
    (``annotations``: relative_im_path, bbox_x1..bbox_y2, class, test; ``class_names``)

``kaggle``  (devkit files anywhere under the root, maybe renamed, e.g.
``cars_test_annos_withlabels (1).mat``; images one folder deeper:
``cars_train/cars_train/``, ``cars_test/cars_test/``).

Annotation files are recognised by their content (variables and record fields)
and, where contents alike (train vs test annotations), by their names (see
:mod:`finegrain.data.stanford_cars_files`). Devkit
boxes and classes are 1-based; records carry 0-based labels and inclusive 0-based
boxes. Train and test images share file names, so every record holds the full
path into its own split's folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.io as sio
from PIL import Image

from finegrain.data.records import ImageCollection, ImageRecord
from finegrain.data.stanford_cars_files import (  # noqa: F401 - KNOWN_MAT_NAMES re-exported
    BOX_FIELDS,
    KNOWN_MAT_NAMES,
    SEARCH_DEPTH,
    Found,
    find_files,
    find_mat_files,
    is_known_name,
    mat_int_value,
    mat_text,
    pick_image_dir,
)
from finegrain.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "stanford_cars"
LAYOUTS = ("devkit", "all_images", "kaggle")

Sample = tuple[Image.Image, int, "tuple[int, int, int, int] | None"]


# --------------------------------------------------------------------------- writing


def write_stanford_cars(
    root: Path,
    class_names: list[str],
    splits: dict[str, list[tuple[Image.Image, int, tuple[int, int, int, int] | None]]],
    layout: str = "devkit",
) -> Path:
    """Write images and genuine-structure ``.mat`` files in one of :data:`LAYOUTS`.

    ``splits`` maps ``"train"`` and/or ``"test"`` to ``(image, label, bbox)`` with
    0-based labels and inclusive 0-based boxes (``None``: the whole image). Images
    are saved as JPEG (quality 95). Returns ``root``.
    """
    if layout not in LAYOUTS:
        raise DataError(f"unknown Stanford Cars layout '{layout}'; valid: {', '.join(LAYOUTS)}")
    bad = set(splits) - {"train", "test"}
    if bad:
        raise DataError(f"Stanford Cars splits are 'train' and 'test', got {sorted(bad)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = {"class_names": _cell_row(class_names)}
    if layout == "all_images":
        _write_all_images(root, meta, splits)
        return root
    devkit = root / ("devkit" if layout == "devkit" else "car_devkit/devkit")
    devkit.mkdir(parents=True, exist_ok=True)
    sio.savemat(devkit / "cars_meta.mat", meta)
    for split, samples in splits.items():
        folder = root / f"cars_{split}"
        if layout == "kaggle":
            folder = folder / f"cars_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (im, label, bbox) in enumerate(samples, start=1):
            fname = f"{i:05d}.jpg"
            _save_jpeg(im, folder / fname)
            rows.append((fname, label, _one_based_box(bbox, im)))
        if split == "train":
            sio.savemat(devkit / "cars_train_annos.mat", {"annotations": _devkit_struct(rows, True)})
        else:
            sio.savemat(devkit / "cars_test_annos.mat", {"annotations": _devkit_struct(rows, False)})
            name = "cars_test_annos_withlabels.mat" if layout == "devkit" else "cars_test_annos_withlabels (1).mat"
            sio.savemat(root / name, {"annotations": _devkit_struct(rows, True)})
    return root


def _write_all_images(root: Path, meta: dict, splits: dict[str, list[Sample]]) -> None:
    ims = root / "car_ims"
    ims.mkdir(parents=True, exist_ok=True)
    rows = []
    n = 0
    for split in ("train", "test"):
        for im, label, bbox in splits.get(split, []):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            _save_jpeg(im, root / rel)
            rows.append((rel, label, _one_based_box(bbox, im), int(split == "test")))
    dtype = [("relative_im_path", "O")] + [(f, "O") for f in BOX_FIELDS] + [("class", "O"), ("test", "O")]
    arr = np.zeros((1, len(rows)), dtype=dtype)
    for j, (rel, label, box, test) in enumerate(rows):
        arr[0, j] = (np.array([rel]), *(_mat_int(v) for v in box), _mat_int(label + 1), _mat_int(test))
    sio.savemat(root / "cars_annos.mat", {"annotations": arr, **meta})


def _devkit_struct(rows: list[tuple[str, int, tuple[int, int, int, int]]], with_class: bool) -> np.ndarray:
    names = list(BOX_FIELDS) + (["class"] if with_class else []) + ["fname"]
    arr = np.zeros((1, len(rows)), dtype=[(n, "O") for n in names])
    for j, (fname, label, box) in enumerate(rows):
        vals = [_mat_int(v) for v in box] + ([_mat_int(label + 1)] if with_class else []) + [np.array([fname])]
        arr[0, j] = tuple(vals)
    return arr


def _cell_row(strings: list[str]) -> np.ndarray:
    cell = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        cell[0, i] = np.array([s])
    return cell


def _mat_int(v: int) -> np.ndarray:
    return np.array([[int(v)]], dtype=np.uint16 if v < 65536 else np.uint32)


def _one_based_box(bbox: tuple[int, int, int, int] | None, im: Image.Image) -> tuple[int, int, int, int]:
    if bbox is None:
        return 1, 1, im.width, im.height
    return tuple(int(v) + 1 for v in bbox)  # type: ignore[return-value]


def _save_jpeg(im: Image.Image, path: Path) -> None:
    if im.mode not in ("RGB", "L", "CMYK"):
        im = im.convert("RGB")
    im.save(path, format="JPEG", quality=95)


# --------------------------------------------------------------------------- reading


def looks_like_stanford_cars(root: Path) -> bool:
    """Cheap test for detection: a known Stanford Cars ``.mat`` name within the search depth."""
    return any(is_known_name(p) for p in find_mat_files(Path(root)))


def read_stanford_cars(root: Path) -> ImageCollection:
    """Read any of the three layouts under ``root`` into an :class:`ImageCollection`.

    Splits ``train`` and ``test``; a split whose images or labels are absent is
    explained in ``missing``; annotated images absent on disk are dropped and
    counted in ``notes``. Raises :class:`DataError` when no layout matches or an
    annotation file is unreadable.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"Stanford Cars root {root} is not a folder")
    found = find_files(root)
    for p in found.unused:
        log.debug("ignoring unrelated .mat file %s", p)
    if found.all_images:
        mat_path, recs, names = found.all_images[0]
        if not names and found.meta:
            names = found.meta[0][1]
        if names and _all_images_present(mat_path, recs):
            return _read_all_images(root, mat_path, recs, names)
    if found.meta and (found.train or found.test_labeled):
        return _read_devkit(root, found)
    raise DataError(_no_layout_message(root, found))


def _all_images_present(mat_path: Path, recs: np.ndarray) -> bool:
    if recs.size == 0:
        return False
    rel = mat_text(recs[0]["relative_im_path"])
    return (mat_path.parent / rel).is_file()


def _read_all_images(root: Path, mat_path: Path, recs: np.ndarray, names: list[str]) -> ImageCollection:
    base = mat_path.parent
    splits: dict[str, list[ImageRecord]] = {"train": [], "test": []}
    absent = {"train": 0, "test": 0}
    for r in recs:
        split = "test" if mat_int_value(r["test"]) else "train"
        path = base / mat_text(r["relative_im_path"])
        if not path.is_file():
            absent[split] += 1
            continue
        splits[split].append(_record(path, r, len(names), mat_path))
    notes = [f"Stanford Cars, 'all images' layout: annotations from {mat_path}"]
    notes += _absent_notes(absent, base / "car_ims")
    missing = {
        s: f"no {s} images: none of the {s} records of {mat_path} has its file under {base}"
        for s in ("train", "test")
        if not splits[s]
    }
    for s in missing:
        del splits[s]
    if not splits:
        raise DataError(f"{root}: {mat_path} lists images, but none of them exists under {base}")
    return ImageCollection(FORMAT, root, names, splits, missing, notes)


def _read_devkit(root: Path, found: Found) -> ImageCollection:
    meta_path, names = found.meta[0]
    notes: list[str] = []
    missing: dict[str, str] = {}
    splits: dict[str, list[ImageRecord]] = {}
    nested = False
    for split, candidates in (("train", found.train), ("test", found.test_labeled)):
        if not candidates:
            missing[split] = _missing_annos(root, split, found)
            continue
        ann_path, recs = candidates[0]
        fnames = [mat_text(r["fname"]) for r in recs]
        folder = pick_image_dir(root, split, fnames)
        if folder is None:
            missing[split] = (
                f"{split} images not found: looked for a folder cars_{split}/ (or cars_{split}/cars_{split}/) "
                f"under {root}, up to {SEARCH_DEPTH} levels deep, holding the {len(fnames)} files "
                f"listed in {ann_path}"
            )
            continue
        nested = nested or folder.parent.name == folder.name
        records, absent = [], 0
        for r, fname in zip(recs, fnames, strict=True):
            path = folder / fname
            if not path.is_file():
                absent += 1
                continue
            records.append(_record(path, r, len(names), ann_path))
        if absent:
            notes.append(f"{absent} annotated {split} images not found under {folder} (dropped)")
        if not records:
            missing[split] = f"{split} images not found: none of the {len(fnames)} files of {ann_path} is in {folder}"
            continue
        splits[split] = records
        notes.append(f"{split}: annotations {ann_path}, images {folder}")
    if not splits:
        raise DataError(
            f"{root}: Stanford Cars annotations found but no images: "
            + "; ".join(f"{k}: {v}" for k, v in missing.items())
        )
    layout = "kaggle" if nested or meta_path.parent.parent != root else "devkit"
    notes.insert(0, f"Stanford Cars, '{layout}' layout: class names from {meta_path}")
    return ImageCollection(FORMAT, root, names, splits, missing, notes)


def _missing_annos(root: Path, split: str, found: Found) -> str:
    if split == "train":
        return (
            f"train annotations not found: looked for a .mat file with an 'annotations' struct "
            f"(fields bbox_x1..bbox_y2, class, fname; e.g. devkit/cars_train_annos.mat) under {root}"
        )
    msg = (
        f"test labels not found: looked for cars_test_annos_withlabels.mat (an 'annotations' struct "
        f"with a 'class' field) under {root}, up to {SEARCH_DEPTH} levels deep"
    )
    if found.test_unlabeled:
        msg += f"; only {found.test_unlabeled[0][0]} was found, and it has no class labels"
    return msg


def _record(path: Path, r: np.void, num_classes: int, ann_path: Path) -> ImageRecord:
    label = mat_int_value(r["class"]) - 1
    if not 0 <= label < num_classes:
        raise DataError(f"{ann_path}: class {label + 1} of {path.name} is outside 1..{num_classes}")
    box = tuple(mat_int_value(r[f]) - 1 for f in BOX_FIELDS)
    return ImageRecord(path=path, label=label, bbox=box)  # type: ignore[arg-type]


def _absent_notes(absent: dict[str, int], where: Path) -> list[str]:
    return [f"{n} annotated {s} images not found under {where} (dropped)" for s, n in absent.items() if n]


def _no_layout_message(root: Path, found: Found) -> str:
    have = []
    if found.meta:
        have.append(f"class names in {found.meta[0][0]}")
    if found.train:
        have.append(f"train annotations in {found.train[0][0]}")
    if found.test_labeled:
        have.append(f"labelled test annotations in {found.test_labeled[0][0]}")
    if found.all_images:
        have.append(f"all-images annotations in {found.all_images[0][0]} (their image files are absent)")
    return (
        f"{root} does not look like Stanford Cars. Looked under it (up to {SEARCH_DEPTH} levels) for: "
        "devkit layout: devkit/cars_meta.mat (class_names) + devkit/cars_train_annos.mat and/or "
        "cars_test_annos_withlabels.mat + cars_train/ and cars_test/ folders; "
        "all-images layout: cars_annos.mat + car_ims/; "
        "kaggle layout: the devkit .mat files anywhere (possibly renamed) + cars_train/cars_train/. "
        + ("Found: " + "; ".join(have) + "." if have else "Found no Stanford Cars .mat file.")
    )
