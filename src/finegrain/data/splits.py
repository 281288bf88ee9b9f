"""Evaluation protocols: turn an :class:`ImageCollection` into train / val / test.

Where the test images come from (``holdout``, ``data.holdout`` of a config):

- ``"auto"``: the data's own test split wherever it has one; else a held-out part of the
  data (classification: a seeded stratified ``holdout_fraction`` of the train split;
  retrieval: the second half of the classes).
- a number (classification): a seeded stratified holdout of that fraction of the train split,
  even where the data has a test split, which is then not used, with a warning.
- ``None``: classification on the official test split (an error when there is none);
  retrieval on the second half of the classes (the Cars196 protocol: every split merged).

``classification``: train = the train split minus the test holdout (if any) and a seeded,
stratified val carve-out.

``retrieval``: on held-out classes (class-disjoint, the Cars196 protocol) the first half of the
classes by label (``0 .. n//2 - 1``) with all their images from every official split is train,
the second half is test; on the data's test split, train is the train split. Val is a seeded
``val_fraction`` of the train classes, with all their images.

Every split says what it was tested on (:attr:`Split.tested_on`): the log, ``metrics.json``,
the report and the experiment tables show it.

Every random choice is seeded and made on records sorted by (label, path), so
the result depends only on the seed and the set of files, not on listing order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from finegrain.data.records import ImageCollection, ImageRecord
from finegrain.errors import ConfigError, DataError, unknown_name

log = logging.getLogger(__name__)

PROTOCOLS = ("classification", "retrieval")
TEST_SOURCES = ("test split", "holdout", "held-out classes")
"""What a split's test images are: the data's own test split, a holdout of its train split, or the
images of classes held out of training."""


@dataclass
class Split:
    """The records a task trains, validates and tests on, and how they were chosen."""

    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    class_names: list[str]  # global names; every label indexes into them
    protocol: str  # "classification" | "retrieval"
    description: str  # one sentence for metrics.json and reports
    test_source: str = "test split"  # one of TEST_SOURCES
    tested_on: str = ""  # what the test images are, in a few words (metrics.json's headline "tested_on")
    warnings: list[str] = field(default_factory=list)  # said loudly: the data's own test split unused

    def sizes(self) -> dict[str, int]:
        """Number of images per part."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def tested_on_record(self) -> dict:
        """``metrics.json``'s headline ``tested_on``: the source, the image count and the words."""
        return {"source": self.test_source, "images": len(self.test), "words": self.tested_on}


def make_split(
    collection: ImageCollection,
    protocol: str = "classification",
    holdout: float | str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    holdout_fraction: float = 0.2,
) -> Split:
    """Apply ``protocol`` to ``collection``; fractions are of images (classification)
    or of classes (retrieval val), in ``[0, 1)``; ``holdout`` as the module docstring says
    (``holdout_fraction``: what ``"auto"`` holds out of data without a test split)."""
    if protocol not in PROTOCOLS:
        raise unknown_name("protocol", protocol, PROTOCOLS)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if holdout == "auto":
        if not 0.0 < holdout_fraction < 1.0:
            raise ConfigError(f"data.holdout_fraction must be in (0, 1), got {holdout_fraction}")
    elif holdout is not None and (isinstance(holdout, str) or not 0.0 < holdout < 1.0):
        raise ConfigError(f"data.holdout must be auto, a fraction in (0, 1) or null, got {holdout}")
    split = (
        _classification(collection, holdout, holdout_fraction, val_fraction, seed)
        if protocol == "classification"
        else _retrieval(collection, holdout, val_fraction, seed)
    )
    for warning in split.warnings:
        log.warning("%s", warning)
    return split


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


def _unused_test_warning(c: ImageCollection, holdout: float | str | None, instead: str) -> str:
    """The loud line of a run that does not test on the data's own test split."""
    asked = f"data.holdout={holdout}" if holdout is not None else "data.holdout=null"
    return (
        f"NOT TESTED ON YOUR TEST SPLIT: {c.root} has a test split ({len(c.splits['test']):,} images) but "
        f"{asked} tests on {instead} instead; set data.holdout=auto to test on your test split"
    )


def _classification(
    c: ImageCollection, holdout: float | str | None, holdout_fraction: float, val_fraction: float, seed: int
) -> Split:
    if "train" not in c.splits or not c.splits["train"]:
        why = c.missing.get("train", "the collection has no train split")
        raise DataError(f"{c.root}: no train images for the classification protocol: {why}")
    train = c.splits["train"]
    has_test = bool(c.splits.get("test"))
    fraction = holdout_fraction if holdout == "auto" and not has_test else holdout
    warnings: list[str] = []
    if isinstance(fraction, float | int):
        train, test = stratified_split(train, fraction, seed)
        held = f"a seeded (seed {seed}) stratified {fraction:.0%} holdout of the training images"
        test_desc = f"test = {held} ({len(test)} images)"
        tested_on = f"{held} ({len(test):,} images)"
        if has_test:
            test_desc += "; the official test split is not used"
            tested_on += f"; the data's own test split ({len(c.splits['test']):,} images) is not used"
            warnings.append(_unused_test_warning(c, holdout, f"a {fraction:.0%} holdout of the training images"))
        else:
            tested_on += ": the data has no test split"
        source = "holdout"
    else:
        if not has_test:
            why = c.missing.get("test", "the collection has no test split")
            raise DataError(
                f"{c.root}: the official test images are absent ({why}). "
                "Use a holdout of the train split instead, e.g. data.holdout=auto or data.holdout=0.5"
            )
        test = _sorted(c.splits["test"])
        test_desc = f"test = the official test split ({len(test)} images)"
        tested_on, source = f"the data's own test split ({len(test):,} images)", "test split"
    train, val = stratified_split(train, val_fraction, seed + 1)
    val_desc = (
        f"val = a seeded (seed {seed}) stratified {val_fraction:.0%} of each class of the remaining train images "
        f"({len(val)} images)"
        if val
        else "no val images (val_fraction 0)"
    )
    desc = (
        f"Classification on {c.format} ({c.num_classes} classes): "
        f"train = the official train split{' minus val and test' if source == 'holdout' else ' minus val'} "
        f"({len(train)} images); {val_desc}; {test_desc}."
    )
    return Split(train, val, test, list(c.class_names), "classification", desc, source, tested_on, warnings)


def _retrieval(c: ImageCollection, holdout: float | str | None, val_fraction: float, seed: int) -> Split:
    n = c.num_classes
    if holdout == "auto" and c.splits.get("test") and c.splits.get("train"):
        return _retrieval_on_test_split(c, val_fraction, seed)
    if n < 2:
        raise DataError(f"{c.root}: class-disjoint retrieval needs at least 2 classes, found {n}")
    half = n // 2
    records = _sorted(c.all_records())
    train = [r for r in records if r.label < half]
    test = [r for r in records if r.label >= half]
    train, val, val_classes = _val_classes(train, val_fraction, seed)
    used = [s for s in c.splits if c.splits[s]]
    desc = (
        f"Class-disjoint retrieval on {c.format}: classes 1-{half} (labels 0-{half - 1}) with all their images "
        f"from the official {' and '.join(used)} split{'s' if len(used) > 1 else ''} are train"
        + (
            f" ({len(train)} images), of which {len(val_classes)} classes chosen with seed {seed} are val "
            f"({len(val)} images)"
            if val_classes
            else f" ({len(train)} images)"
        )
        + f"; classes {half + 1}-{n} (labels {half}-{n - 1}, {len(test)} images) are test, "
        "every test image a query against the rest of the test set"
    )
    if c.missing:
        desc += f" (absent: {', '.join(sorted(c.missing))})"
    tested_on = (
        f"classes {half + 1}-{n} held out of training ({len(test):,} images, every one a query against the rest)"
    )
    warnings: list[str] = []
    if c.splits.get("test") and c.splits.get("train"):
        tested_on += f"; the data's own test split ({len(c.splits['test']):,} images) is not the test"
        if holdout is not None:  # null: the Cars196 protocol, asked for by name (as every run before "auto")
            warnings.append(_unused_test_warning(c, holdout, f"classes {half + 1}-{n}, held out of training"))
    elif holdout == "auto":
        tested_on += ": the data has no test split"
    return Split(
        train, val, test, list(c.class_names), "retrieval", desc + ".", "held-out classes", tested_on, warnings
    )


def _val_classes(
    train: list[ImageRecord], val_fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord], set[int]]:
    """(train, val, val classes): a seeded ``val_fraction`` of the train classes, with all their images, is val."""
    train_classes = sorted({r.label for r in train})
    k = min(max(1, int(round(val_fraction * len(train_classes)))), len(train_classes) - 1) if val_fraction > 0 else 0
    rng = np.random.default_rng([seed, 7919])
    val_classes = {train_classes[i] for i in rng.permutation(len(train_classes))[:k].tolist()}
    return ([r for r in train if r.label not in val_classes], [r for r in train if r.label in val_classes], val_classes)


def _retrieval_on_test_split(c: ImageCollection, val_fraction: float, seed: int) -> Split:
    """Retrieval on the data's own split: train learns, every test image queries the rest of the test split."""
    train, val, val_classes = _val_classes(_sorted(c.splits["train"]), val_fraction, seed)
    test = _sorted(c.splits["test"])
    overlap = len({r.label for r in test} & ({r.label for r in train} | val_classes))
    classes = (
        f"{overlap} of its {len({r.label for r in test})} classes also in training"
        if overlap
        else "its classes disjoint from training"
    )
    desc = (
        f"Retrieval on {c.format}: the official train split is train ({len(train)} images"
        + (
            f", of which {len(val_classes)} classes chosen with seed {seed} are val ({len(val)} images)"
            if val_classes
            else ""
        )
        + f"); the official test split ({len(test)} images, {classes}) is test, every test image a query "
        "against the rest of the test set."
    )
    tested_on = f"the data's own test split ({len(test):,} images, {classes})"
    return Split(train, val, test, list(c.class_names), "retrieval", desc, "test split", tested_on)
