from __future__ import annotations

import random
from pathlib import Path

import pytest

from finegrain.data.detect import open_collection
from finegrain.data.records import ImageCollection, ImageRecord
from finegrain.data.splits import make_split
from finegrain.errors import ConfigError, DataError, FinegrainError


def _collection(num_classes=6, per_class=10, test_per_class=4, shuffle_seed=None, missing_test=False):
    train = [ImageRecord(Path(f"/d/train/{c}_{i}.jpg"), c) for c in range(num_classes) for i in range(per_class)]
    test = [ImageRecord(Path(f"/d/test/{c}_{i}.jpg"), c) for c in range(num_classes) for i in range(test_per_class)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(train)
        random.Random(shuffle_seed).shuffle(test)
    splits = {"train": train} if missing_test else {"train": train, "test": test}
    missing = {"test": "test images not found under /d/cars_test"} if missing_test else {}
    return ImageCollection("fake", Path("/d"), [f"c{i}" for i in range(num_classes)], splits, missing)


def _paths(recs):
    return sorted(str(r.path) for r in recs)


def test_classification_val_is_stratified_and_disjoint():
    s = make_split(_collection(), val_fraction=0.2, seed=3)
    assert s.protocol == "classification"
    assert {r.label for r in s.val} == set(range(6)) == {r.label for r in s.train}
    assert all(sum(r.label == c for r in s.val) == 2 for c in range(6))
    assert not set(_paths(s.train)) & set(_paths(s.val))
    assert len(s.train) + len(s.val) == 60 and _paths(s.test) == _paths(_collection().splits["test"])


def test_small_classes_keep_one_val_and_one_train():
    s = make_split(_collection(per_class=2), val_fraction=0.01)
    assert all(sum(r.label == c for r in s.val) == 1 for c in range(6))
    assert all(sum(r.label == c for r in s.train) == 1 for c in range(6))
    assert make_split(_collection(), val_fraction=0.0).val == []


def test_deterministic_and_independent_of_listing_order():
    a = make_split(_collection(shuffle_seed=1), holdout=0.5, seed=7)
    b = make_split(_collection(shuffle_seed=2), holdout=0.5, seed=7)
    assert [r.path for r in a.train] == [r.path for r in b.train]
    assert [r.path for r in a.val] == [r.path for r in b.val]
    assert [r.path for r in a.test] == [r.path for r in b.test]
    c = make_split(_collection(), holdout=0.5, seed=8)
    assert _paths(c.test) != _paths(a.test)


def test_holdout_sizes_and_stratification():
    s = make_split(_collection(missing_test=True), holdout=0.5, val_fraction=0.0)
    assert len(s.test) == 30 and len(s.train) == 30 and s.val == []
    assert all(sum(r.label == c for r in s.test) == 5 for c in range(6))
    assert all("/train/" in str(r.path) for r in s.test)
    assert "holdout" in s.description


def test_missing_test_without_holdout_says_why():
    with pytest.raises(DataError, match=r"test images are absent.*cars_test.*data\.holdout=0\.5"):
        make_split(_collection(missing_test=True))


def test_bad_arguments():
    with pytest.raises(FinegrainError, match="unknown protocol"):
        make_split(_collection(), protocol="fewshot")
    with pytest.raises(ConfigError):
        make_split(_collection(), holdout=1.5)


def test_retrieval_is_class_disjoint_and_uses_every_split():
    s = make_split(_collection(num_classes=7), protocol="retrieval", val_fraction=0.0)
    assert {r.label for r in s.train} == {0, 1, 2}
    assert {r.label for r in s.test} == {3, 4, 5, 6}
    assert len(s.train) == 3 * 14 and len(s.test) == 4 * 14


def test_retrieval_val_is_whole_train_classes():
    s = make_split(_collection(num_classes=12), protocol="retrieval", val_fraction=0.3, seed=1)
    val_cls, train_cls = {r.label for r in s.val}, {r.label for r in s.train}
    assert len(val_cls) == 2 and not val_cls & train_cls and val_cls | train_cls == set(range(6))
    assert len(s.val) == 2 * 14
    s2 = make_split(_collection(num_classes=12, shuffle_seed=5), protocol="retrieval", val_fraction=0.3, seed=1)
    assert _paths(s2.val) == _paths(s.val)


@pytest.mark.realdata
def test_real_cars_protocols(real_cars):
    col = open_collection(real_cars)
    r = make_split(col, protocol="retrieval", val_fraction=0.0)
    assert (len(r.train), len(r.test)) == (4052, 4092)
    assert {x.label for x in r.train} == set(range(98)) and {x.label for x in r.test} == set(range(98, 196))
    c = make_split(col, holdout=0.5, val_fraction=0.0)
    assert abs(len(c.train) - len(c.test)) < 200 and len(c.train) + len(c.test) == 8144
    assert {x.label for x in c.test} == set(range(196))
