"""Evaluation protocols: turn an :class:`ImageCollection` into train / val / test.

``classification``: train = official train minus a seeded, stratified val
carve-out; test = official test, or (``holdout`` set) a seeded stratified
holdout of the official train split.

``retrieval`` (class-disjoint, the Cars196 protocol): the first half of the
classes by label (``0 .. n//2 - 1``) with all their images from every official
split is train, the second half is test; val is a seeded ``val_fraction`` of the
train classes, with all their images.

Every random choice is seeded and made on records sorted by (label, path), so
the result depends only on the seed and the set of files, not on listing order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finegrain.data.records import ImageCollection, ImageRecord
from finegrain.errors import ConfigError, DataError, unknown_name

PROTOCOLS = ("classification", "retrieval")


@dataclass
class Split:
    """The records a task trains, validates and tests on, and how they were chosen."""

    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    class_names: list[str]  # global names; every label indexes into them
    protocol: str  # "classification" | "retrieval"
    description: str  # one sentence for metrics.json and reports

    def sizes(self) -> dict[str, int]:
        """Number of images per part."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def make_split(
    collection: ImageCollection,
    protocol: str = "classification",
    holdout: float | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Split:
    """Apply ``protocol`` to ``collection``; fractions are of images (classification)
    or of classes (retrieval val), in ``[0, 1)``."""
    if protocol not in PROTOCOLS:
        raise unknown_name("protocol", protocol, PROTOCOLS)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if holdout is not None and not 0.0 < holdout < 1.0:
        raise ConfigError(f"data.holdout must be in (0, 1) or null, got {holdout}")
    if protocol == "classification":
        return _classification(collection, holdout, val_fraction, seed)
    return _retrieval(collection, holdout, val_fraction, seed)


def _sorted(records: list[ImageRecord]) -> list[ImageRecord]:
    return sorted(records, key=lambda r: (r.label, str(r.path), r.bbox or ()))


def _by_class(records: list[ImageRecord]) -> dict[int, list[ImageRecord]]:
    out: dict[int, list[ImageRecord]] = {}
    for r in _sorted(records):
        out.setdefault(r.label, []).append(r)
    return out


def _take(n: int, fraction: float) -> int:
    """How many of ``n`` images go to a carve-out: round(fraction * n), at least 1
    when n >= 2 and fraction > 0, always leaving at least 1."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(1, int(round(fraction * n))), n - 1)


def stratified_split(
    records: list[ImageRecord], fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split ``records`` into (rest, carved) with ``fraction`` of every class carved out."""
    rest: list[ImageRecord] = []
    carved: list[ImageRecord] = []
    for label, recs in _by_class(records).items():
        k = _take(len(recs), fraction)
        order = np.random.default_rng([seed, label]).permutation(len(recs))
        chosen = set(order[:k].tolist())
        for i, r in enumerate(recs):
            (carved if i in chosen else rest).append(r)
    return rest, carved


def _classification(c: ImageCollection, holdout: float | None, val_fraction: float, seed: int) -> Split:
    if "train" not in c.splits or not c.splits["train"]:
        why = c.missing.get("train", "the collection has no train split")
        raise DataError(f"{c.root}: no train images for the classification protocol: {why}")
    train = c.splits["train"]
    if holdout is not None:
        train, test = stratified_split(train, holdout, seed)
        test_desc = (f"test = a seeded (seed {seed}) stratified {holdout:.0%} holdout of the official train split "
                     f"({len(test)} images)")
        if c.splits.get("test"):
            test_desc += "; the official test split is not used"
    else:
        if not c.splits.get("test"):
            why = c.missing.get("test", "the collection has no test split")
            raise DataError(
                f"{c.root}: the official test images are absent ({why}). "
                "Use a holdout of the train split instead, e.g. data.holdout=0.5"
            )
        test = _sorted(c.splits["test"])
        test_desc = f"test = the official test split ({len(test)} images)"
    train, val = stratified_split(train, val_fraction, seed + 1)
    val_desc = (
        f"val = a seeded (seed {seed}) stratified {val_fraction:.0%} of each class of the remaining train images "
        f"({len(val)} images)" if val else "no val images (val_fraction 0)"
    )
    desc = (
        f"Classification on {c.format} ({c.num_classes} classes): "
        f"train = the official train split{' minus val and test' if holdout is not None else ' minus val'} "
        f"({len(train)} images); {val_desc}; {test_desc}."
    )
    return Split(train, val, test, list(c.class_names), "classification", desc)


def _retrieval(c: ImageCollection, holdout: float | None, val_fraction: float, seed: int) -> Split:
    n = c.num_classes
    if n < 2:
        raise DataError(f"{c.root}: class-disjoint retrieval needs at least 2 classes, found {n}")
    half = n // 2
    records = _sorted(c.all_records())
    train = [r for r in records if r.label < half]
    test = [r for r in records if r.label >= half]
    train_classes = sorted({r.label for r in train})
    k = min(max(1, int(round(val_fraction * len(train_classes)))), len(train_classes) - 1) if val_fraction > 0 else 0
    rng = np.random.default_rng([seed, 7919])
    val_classes = {train_classes[i] for i in rng.permutation(len(train_classes))[:k].tolist()}
    val = [r for r in train if r.label in val_classes]
    train = [r for r in train if r.label not in val_classes]
    used = [s for s in c.splits if c.splits[s]]
    desc = (
        f"Class-disjoint retrieval on {c.format}: classes 1-{half} (labels 0-{half - 1}) with all their images "
        f"from the official {' and '.join(used)} split{'s' if len(used) > 1 else ''} are train"
        + (f" ({len(train)} images), of which {len(val_classes)} classes chosen with seed {seed} are val "
           f"({len(val)} images)" if val_classes else f" ({len(train)} images)")
        + f"; classes {half + 1}-{n} (labels {half}-{n - 1}, {len(test)} images) are test, "
        "every test image a query against the rest of the test set"
    )
    if c.missing:
        desc += f" (absent: {', '.join(sorted(c.missing))})"
    if holdout is not None:
        desc += f"; data.holdout={holdout} does not apply to retrieval and was not used"
    return Split(train, val, test, list(c.class_names), "retrieval", desc + ".")

