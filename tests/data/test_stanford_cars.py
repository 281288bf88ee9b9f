from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from finegrain.data.detect import detect_format, open_collection
from finegrain.data.stanford_cars import read_stanford_cars, write_stanford_cars
from finegrain.errors import DataError
from tests.data.conftest import make_samples

NAMES = ["Alpha Coupe 2012", "Beta Sedan 2007", "Gamma SUV 2009"]


def _write(root: Path, layout: str):
    train = make_samples(3, 3, seed=1)
    test = make_samples(3, 2, seed=2)
    write_stanford_cars(root, NAMES, {"train": train, "test": test}, layout=layout)
    return train, test


@pytest.mark.parametrize("layout", ["devkit", "all_images", "kaggle"])
def test_round_trip_every_layout(tmp_path, layout):
    train, test = _write(tmp_path, layout)
    assert detect_format(tmp_path) == "stanford_cars"
    col = read_stanford_cars(tmp_path)
    assert col.class_names == NAMES
    assert set(col.splits) == {"train", "test"} and not col.missing
    for split, samples in (("train", train), ("test", test)):
        recs = col.splits[split]
        assert [r.label for r in recs] == [s[1] for s in samples]
        assert [r.bbox for r in recs] == [s[2] for s in samples]
        # pixels of each record are those written for that split (JPEG: approximately)
        for r, (im, _, _) in zip(recs, samples, strict=True):
            got = np.asarray(Image.open(r.path).convert("RGB"), dtype=float)
            assert np.abs(got - np.asarray(im, dtype=float)).mean() < 12


def test_bbox_none_becomes_whole_image(tmp_path):
    im = Image.new("RGB", (20, 10))
    write_stanford_cars(tmp_path, NAMES, {"train": [(im, 2, None)]})
    (rec,) = read_stanford_cars(tmp_path).splits["train"]
    assert rec.label == 2 and rec.bbox == (0, 0, 19, 9)


def test_writer_mirrors_real_devkit_structure(tmp_path):
    _write(tmp_path, "devkit")
    ann = sio.loadmat(tmp_path / "devkit" / "cars_train_annos.mat")["annotations"]
    assert ann.shape == (1, 9)
    assert ann.dtype.names == ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    assert str(ann[0, 0]["fname"][0]) == "00001.jpg" and int(ann[0, 0]["class"][0, 0]) == 1  # 1-based
    unlabeled = sio.loadmat(tmp_path / "devkit" / "cars_test_annos.mat")["annotations"]
    assert "class" not in unlabeled.dtype.names
    meta = sio.loadmat(tmp_path / "devkit" / "cars_meta.mat")["class_names"]
    assert meta.shape == (1, 3) and str(meta[0, 0][0]) == NAMES[0]


def test_same_file_names_resolve_to_their_own_folders(tmp_path):
    _write(tmp_path, "devkit")
    col = read_stanford_cars(tmp_path)
    tr = {r.path.name: r.path for r in col.splits["train"]}
    te = {r.path.name: r.path for r in col.splits["test"]}
    assert "00001.jpg" in tr and "00001.jpg" in te
    assert tr["00001.jpg"].parent.name == "cars_train" and te["00001.jpg"].parent.name == "cars_test"
    assert tr["00001.jpg"].read_bytes() != te["00001.jpg"].read_bytes()


def test_kaggle_renamed_annotation_nested_deep(tmp_path):
    _write(tmp_path, "kaggle")
    # move the renamed labelled test file somewhere odd, three levels down
    src = tmp_path / "cars_test_annos_withlabels (1).mat"
    dest = tmp_path / "extra" / "annos" / "misc" / "test_labels copy.mat"
    dest.parent.mkdir(parents=True)
    shutil.move(src, dest)
    col = read_stanford_cars(tmp_path)
    assert len(col.splits["test"]) == 6 and "test" not in col.missing
    assert all(r.path.parent == tmp_path / "cars_test" / "cars_test" for r in col.splits["test"])
    assert any("kaggle" in n for n in col.notes)


def test_missing_test_folder_is_explained(tmp_path):
    _write(tmp_path, "devkit")
    shutil.rmtree(tmp_path / "cars_test")
    col = read_stanford_cars(tmp_path)
    assert len(col.splits["train"]) == 9 and "test" not in col.splits
    assert "cars_test" in col.missing["test"] and str(tmp_path) in col.missing["test"]


def test_missing_test_labels_is_explained(tmp_path):
    _write(tmp_path, "devkit")
    (tmp_path / "cars_test_annos_withlabels.mat").unlink()
    col = read_stanford_cars(tmp_path)
    assert "test" not in col.splits
    assert "labels" in col.missing["test"] and "cars_test_annos.mat" in col.missing["test"]


def test_absent_images_dropped_with_note(tmp_path):
    _write(tmp_path, "devkit")
    (tmp_path / "cars_train" / "00002.jpg").unlink()
    (tmp_path / "cars_train" / "00005.jpg").unlink()
    col = read_stanford_cars(tmp_path)
    assert len(col.splits["train"]) == 7
    assert any(n.startswith("2 annotated train images not found") for n in col.notes)


def test_text_file_named_meta_mat_names_the_file(tmp_path):
    _write(tmp_path, "devkit")
    bad = tmp_path / "devkit" / "cars_meta.mat"
    bad.write_text("this is not a mat file\n")
    with pytest.raises(DataError, match="cars_meta.mat"):
        read_stanford_cars(tmp_path)


def test_mat_with_wrong_variables_names_the_file(tmp_path):
    _write(tmp_path, "devkit")
    bad = tmp_path / "devkit" / "cars_train_annos.mat"
    sio.savemat(bad, {"something": np.arange(3)})
    with pytest.raises(DataError, match=r"cars_train_annos\.mat.*expected"):
        read_stanford_cars(tmp_path)


def test_root_matching_no_layout(tmp_path):
    (tmp_path / "cars_train").mkdir()
    with pytest.raises(DataError, match="does not look like Stanford Cars.*cars_meta.mat"):
        read_stanford_cars(tmp_path)
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        open_collection(tmp_path)


@pytest.mark.realdata
def test_real_cars(real_cars):
    col = open_collection(real_cars)
    assert col.format == "stanford_cars"
    assert len(col.splits["train"]) == 8144 and col.num_classes == 196
    assert col.class_names[0] == "AM General Hummer SUV 2000"
    assert "test" not in col.splits and "cars_test" in col.missing["test"]
    assert {r.label for r in col.splits["train"]} == set(range(196))
    assert all(r.path.parent.name == "cars_train" for r in col.splits["train"])
