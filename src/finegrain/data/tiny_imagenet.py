"""Tiny ImageNet (official ``tiny-imagenet-200`` layout): reading and writing.

Layout::

    wnids.txt                                 one WordNet id per line: the classes, in label order
    words.txt                                 "<wnid>\\t<synonym>, <synonym>, ..." (may list many more wnids)
    train/<wnid>/images/<wnid>_<i>.JPEG
    train/<wnid>/<wnid>_boxes.txt             "<file>\\t<x1>\\t<y1>\\t<x2>\\t<y2>"
    val/images/val_<n>.JPEG
    val/val_annotations.txt                   "<file>\\t<wnid>\\t<x1>\\t<y1>\\t<x2>\\t<y2>"

Labels follow the order of ``wnids.txt``. A class name is the first synonym of
its wnid in ``words.txt`` (e.g. ``goldfish``); when two classes would share a
name, or a wnid has no entry, the wnid is added: ``crane (n02012849)``. The
wnids themselves, in label order, come from :func:`read_wnids`. Boxes are taken
as inclusive 0-based pixels. The labelled validation set becomes split ``test``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from finegrain.data.records import ImageCollection, ImageRecord
from finegrain.errors import DataError

FORMAT = "tiny_imagenet"
VAL_NOTE = "validation used as test (official test set has no labels)"


# --------------------------------------------------------------------------- writing


def write_tiny_imagenet(
    root: Path,
    wnids: list[str],
    words: dict[str, str],
    splits: dict[str, list[tuple[Image.Image, int, tuple[int, int, int, int] | None]]],
) -> Path:
    """Write the official layout: ``splits`` maps ``"train"`` / ``"val"`` to
    ``(image, label, bbox)`` (0-based label into ``wnids``; inclusive 0-based box,
    ``None`` = whole image). ``words`` maps wnid to its synonyms line. Returns ``root``."""
    bad = set(splits) - {"train", "val"}
    if bad:
        raise DataError(f"Tiny ImageNet splits are 'train' and 'val', got {sorted(bad)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\t{words.get(w, w)}\n" for w in wnids))
    boxes: dict[str, list[str]] = {w: [] for w in wnids}
    counts: Counter[str] = Counter()
    for im, label, bbox in splits.get("train", []):
        wnid = wnids[label]
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{wnid}_{counts[wnid]}.JPEG"
        counts[wnid] += 1
        _save(im, folder / name)
        boxes[wnid].append(f"{name}\t" + "\t".join(map(str, _box(bbox, im))))
    if "train" in splits:
        for wnid, lines in boxes.items():
            (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(f"{ln}\n" for ln in lines))
    if "val" in splits:
        (root / "val" / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for n, (im, label, bbox) in enumerate(splits["val"]):
            name = f"val_{n}.JPEG"
            _save(im, root / "val" / "images" / name)
            lines.append(f"{name}\t{wnids[label]}\t" + "\t".join(map(str, _box(bbox, im))))
        (root / "val" / "val_annotations.txt").write_text("".join(f"{ln}\n" for ln in lines))
    return root


def _box(bbox: tuple[int, int, int, int] | None, im: Image.Image) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in bbox) if bbox is not None else (0, 0, im.width - 1, im.height - 1)  # type: ignore[return-value]


def _save(im: Image.Image, path: Path) -> None:
    if im.mode not in ("RGB", "L", "CMYK"):
        im = im.convert("RGB")
    im.save(path, format="JPEG", quality=95)


# --------------------------------------------------------------------------- reading


def looks_like_tiny_imagenet(root: Path) -> bool:
    """Cheap detection test: ``wnids.txt`` and a ``train/`` or ``val/`` folder."""
    root = Path(root)
    return (root / "wnids.txt").is_file() and ((root / "train").is_dir() or (root / "val").is_dir())


def read_wnids(root: Path) -> list[str]:
    """The wnids of ``root/wnids.txt``, in label order."""
    path = Path(root) / "wnids.txt"
    if not path.is_file():
        raise DataError(f"{path}: not found (Tiny ImageNet needs wnids.txt, one WordNet id per line)")
    wnids = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not wnids:
        raise DataError(f"{path}: empty; expected one WordNet id per line")
    dup = [w for w, c in Counter(wnids).items() if c > 1]
    if dup:
        raise DataError(f"{path}: wnids listed twice: {', '.join(dup[:5])}")
    return wnids


def class_names_for(wnids: list[str], words: dict[str, str]) -> list[str]:
    """First synonym per wnid, with the wnid appended where needed to stay unique."""
    first = [words[w].split(",")[0].strip() if words.get(w, "").strip() else w for w in wnids]
    counts = Counter(first)
    return [f"{n} ({w})" if counts[n] > 1 and n != w else n for n, w in zip(first, wnids, strict=True)]


def _read_words(root: Path) -> dict[str, str]:
    path = root / "words.txt"
    if not path.is_file():
        return {}
    words = {}
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if "\t" in ln:
            wnid, text = ln.split("\t", 1)
            words[wnid.strip()] = text.strip()
    return words


def _read_boxes(path: Path, columns: int) -> dict[str, list[str]]:
    """Rows of a tab-separated annotation file keyed by file name; DataError on a short row."""
    rows = {}
    for i, ln in enumerate(path.read_text().splitlines(), start=1):
        if not ln.strip():
            continue
        parts = ln.split()
        if len(parts) != columns:
            raise DataError(f"{path}, line {i}: expected {columns} fields, got {len(parts)}: {ln!r}")
        rows[parts[0]] = parts[1:]
    return rows


def _to_box(vals: list[str], path: Path) -> tuple[int, int, int, int]:
    try:
        return tuple(int(v) for v in vals)  # type: ignore[return-value]
    except ValueError:
        raise DataError(f"{path}: box {vals} is not four integers") from None


def read_tiny_imagenet(root: Path) -> ImageCollection:
    """Read the official layout into splits ``train`` and ``test`` (= validation)."""
    root = Path(root).expanduser().resolve()
    wnids = read_wnids(root)
    index = {w: i for i, w in enumerate(wnids)}
    names = class_names_for(wnids, _read_words(root))
    notes: list[str] = []
    missing: dict[str, str] = {}
    splits: dict[str, list[ImageRecord]] = {}
    train = _read_train(root, wnids, notes)
    if train:
        splits["train"] = train
    else:
        missing["train"] = f"no train images: looked for {root}/train/<wnid>/images/*.JPEG for the {len(wnids)} wnids"
    test = _read_val(root, index, notes)
    if test:
        splits["test"] = test
        notes.append(VAL_NOTE)
    else:
        missing["test"] = (
            f"no validation images (used as test): looked for {root}/val/val_annotations.txt and {root}/val/images/"
        )
    if not splits:
        raise DataError(f"{root}: Tiny ImageNet wnids.txt found but no images. " + " ".join(missing.values()))
    return ImageCollection(FORMAT, root, names, splits, missing, notes)


def _read_train(root: Path, wnids: list[str], notes: list[str]) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    absent_classes = []
    for label, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            absent_classes.append(wnid)
            continue
        box_file = root / "train" / wnid / f"{wnid}_boxes.txt"
        boxes = _read_boxes(box_file, 5) if box_file.is_file() else {}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in (".jpeg", ".jpg", ".png") or not path.is_file():
                continue
            box = boxes.get(path.name)
            records.append(ImageRecord(path, label, _to_box(box, box_file) if box else None))
    if absent_classes and len(absent_classes) < len(wnids):
        notes.append(
            f"{len(absent_classes)} classes have no train folder under {root / 'train'} "
            f"(e.g. {', '.join(absent_classes[:3])})"
        )
    return records


def _read_val(root: Path, index: dict[str, int], notes: list[str]) -> list[ImageRecord]:
    ann = root / "val" / "val_annotations.txt"
    images = root / "val" / "images"
    if not ann.is_file() or not images.is_dir():
        return []
    records, absent = [], 0
    for name, fields in sorted(_read_boxes(ann, 6).items()):
        wnid = fields[0]
        if wnid not in index:
            raise DataError(f"{ann}: {name} has wnid {wnid}, which is not in wnids.txt")
        path = images / name
        if not path.is_file():
            absent += 1
            continue
        records.append(ImageRecord(path, index[wnid], _to_box(fields[1:], ann)))
    if absent:
        notes.append(f"{absent} annotated validation images not found under {images} (dropped)")
    return records
