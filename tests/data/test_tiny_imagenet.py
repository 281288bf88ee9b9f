from __future__ import annotations

import pytest

from finegrain.data.detect import detect_format, open_collection
from finegrain.data.tiny_imagenet import (
    VAL_NOTE,
    class_names_for,
    read_tiny_imagenet,
    read_wnids,
    write_tiny_imagenet,
)
from finegrain.errors import DataError
from tests.data.conftest import make_samples

WNIDS = ["n03", "n01", "n02"]  # deliberately unsorted: labels follow wnids.txt order
WORDS = {"n01": "goldfish, Carassius auratus", "n02": "cat", "n03": "dog, domestic dog"}


def _write(root):
    train = make_samples(3, 3, seed=1)
    val = make_samples(3, 2, seed=2)
    write_tiny_imagenet(root, WNIDS, WORDS, {"train": train, "val": val})
    return train, val


def test_round_trip(tmp_path):
    train, val = _write(tmp_path)
    assert detect_format(tmp_path) == "tiny_imagenet"
    col = read_tiny_imagenet(tmp_path)
    assert col.class_names == ["dog", "goldfish", "cat"]
    assert read_wnids(tmp_path) == WNIDS
    assert set(col.splits) == {"train", "test"} and VAL_NOTE in col.notes
    assert sorted((r.label, r.bbox) for r in col.splits["train"]) == sorted((s[1], s[2]) for s in train)
    assert sorted((r.label, r.bbox) for r in col.splits["test"]) == sorted((s[1], s[2]) for s in val)
    for r in col.splits["train"]:
        assert r.path.parent.parent.name == WNIDS[r.label]


def test_class_names_disambiguated_by_wnid():
    names = class_names_for(["a1", "a2", "a3"], {"a1": "crane, bird", "a2": "crane", "a3": ""})
    assert names == ["crane (a1)", "crane (a2)", "a3"]


def test_missing_val_explained(tmp_path):
    write_tiny_imagenet(tmp_path, WNIDS, WORDS, {"train": make_samples(3, 2)})
    col = read_tiny_imagenet(tmp_path)
    assert "test" not in col.splits and "val_annotations.txt" in col.missing["test"]


def test_val_wnid_not_in_wnids_names_the_file(tmp_path):
    _write(tmp_path)
    ann = tmp_path / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text().replace("n01", "n99", 1))
    with pytest.raises(DataError, match="val_annotations.txt.*n99"):
        read_tiny_imagenet(tmp_path)


def test_malformed_boxes_line_names_file_and_line(tmp_path):
    _write(tmp_path)
    boxes = tmp_path / "train" / "n01" / "n01_boxes.txt"
    boxes.write_text(boxes.read_text() + "broken line\n")
    with pytest.raises(DataError, match=r"n01_boxes.txt, line 4"):
        read_tiny_imagenet(tmp_path)


@pytest.mark.realdata
def test_real_tiny_imagenet(real_tiny_imagenet):
    col = open_collection(real_tiny_imagenet)
    assert col.format == "tiny_imagenet" and col.num_classes == 200
    assert len(col.splits["train"]) == 20000 and len(col.splits["test"]) == 10000
    assert len(set(col.class_names)) == 200
    assert {r.label for r in col.splits["test"]} == set(range(200))
    assert all(r.bbox is not None for r in col.splits["test"])
