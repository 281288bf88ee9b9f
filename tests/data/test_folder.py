from __future__ import annotations

import pytest

from finegrain.data.detect import FORMATS, detect_format, open_collection, open_gallery_folder
from finegrain.data.folder import read_csv, read_image_folder, write_image_folder
from finegrain.data.records import UNLABELLED
from finegrain.errors import DataError, FinegrainError
from tests.data.conftest import make_samples

NAMES = ["zebra", "ant", "moth"]


def _pairs(n_classes=3, per_class=3, seed=0):
    return [(im, label) for im, label, _ in make_samples(n_classes, per_class, seed=seed)]


def test_flat_folder_round_trip(tmp_path):
    write_image_folder(tmp_path, NAMES, {"all": _pairs()})
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    assert detect_format(tmp_path) == "image_folder"
    col = read_image_folder(tmp_path)
    assert col.class_names == sorted(NAMES)
    recs = col.splits["train"]
    assert len(recs) == 9 and "test" in col.missing
    assert all(col.class_names[r.label] == r.path.parent.name for r in recs)
    assert any("1 non-image files ignored" in n for n in col.notes)


def test_train_test_folders_merge_class_sets(tmp_path):
    write_image_folder(tmp_path, NAMES, {"train": _pairs(2, 2), "test": [(im, 2) for im, _ in _pairs(1, 2)]})
    col = read_image_folder(tmp_path)
    assert col.class_names == ["ant", "moth", "zebra"]
    assert {col.class_names[r.label] for r in col.splits["train"]} == {"zebra", "ant"}
    assert {col.class_names[r.label] for r in col.splits["test"]} == {"moth"}
    assert not col.missing


def test_val_folder_is_test_when_no_test_folder(tmp_path):
    write_image_folder(tmp_path, NAMES, {"train": _pairs(), "val": _pairs(seed=1)})
    col = read_image_folder(tmp_path)
    assert len(col.splits["test"]) == 9 and all(r.path.parts[-3] == "val" for r in col.splits["test"])
    assert any("val/ used as the test split" in n for n in col.notes)


def test_csv_round_trip_and_relative_paths(tmp_path):
    write_image_folder(tmp_path / "imgs", NAMES, {"all": _pairs(3, 2)})
    absolute = (tmp_path / "imgs" / "moth" / "4.png").resolve()
    (tmp_path / "list.csv").write_text(
        "path,label,split\n"
        "imgs/zebra/0.png,zebra,train\n"
        "imgs/ant/2.png,ant,\n"
        f"{absolute},moth,test\n"
        "imgs/zebra/missing.png,zebra,train\n"
    )
    assert detect_format(tmp_path / "list.csv") == "csv"
    col = open_collection(tmp_path / "list.csv")
    assert col.class_names == ["ant", "moth", "zebra"]
    assert [(r.path.name, r.label) for r in col.splits["train"]] == [("0.png", 2), ("2.png", 0)]
    assert [r.path for r in col.splits["test"]] == [absolute]
    assert any("1 listed images not found" in n for n in col.notes)


@pytest.mark.parametrize(
    "body, match",
    [
        ("file,class\na.png,x\n", r"line 1: expected a header"),
        ("path,label\na.png,x\nb.png\n", r"list.csv, line 3: expected 2 fields"),
        ("path,label,split\na.png,x,holdout\n", r"line 2: split 'holdout'"),
    ],
)
def test_csv_malformed_rows_name_file_and_line(tmp_path, body, match):
    (tmp_path / "list.csv").write_text(body)
    with pytest.raises(DataError, match=match):
        read_csv(tmp_path / "list.csv")


def test_detect_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_collection(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        detect_format(tmp_path / "empty")
    for name in FORMATS:
        assert name in str(e.value)
    with pytest.raises(FinegrainError, match="unknown dataset format 'imagefolder'.*image_folder"):
        open_collection(tmp_path, format="imagefolder")


def test_a_folder_without_class_sub_folders_is_a_gallery_of_unlabelled_images(tmp_path):
    for n, (im, _) in enumerate(_pairs(2, 2)):
        im.save(tmp_path / f"{n}.png")
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / "empty-sub").mkdir()
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        open_collection(tmp_path)  # no dataset to train on: only a gallery takes it
    col = open_gallery_folder(tmp_path)
    assert col.format == "flat_folder" and col.class_names == []
    assert [r.path.name for r in col.all_records()] == ["0.png", "1.png", "2.png", "3.png"]
    assert {r.label for r in col.all_records()} == {UNLABELLED}
    assert col.notes == ["1 non-image files ignored"]


def test_a_gallery_folder_with_class_sub_folders_keeps_its_labels(tmp_path):
    write_image_folder(tmp_path, NAMES, {"all": _pairs()})
    _pairs(1, 1)[0][0].save(tmp_path / "loose.png")
    col = open_gallery_folder(tmp_path)
    assert col.format == "image_folder" and col.class_names == sorted(NAMES)
    assert {col.class_names[r.label] for r in col.all_records()} == set(NAMES)
    # an image beside the class folders is named as ignored, not counted as a non-image file
    assert col.notes == [
        f"1 images directly in {tmp_path.resolve()} ignored: only those in its class sub-folders are read"
    ]


@pytest.mark.parametrize(
    ("files", "held"), [({}, "holds no image"), ({"a.txt": "x"}, "holds 1 file\\(s\\) but no image")]
)
def test_a_gallery_folder_without_images_is_refused_in_one_line(tmp_path, files, held):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=f"{held}: put image files \\(jpg, jpeg, png") as e:
        open_gallery_folder(tmp_path)
    assert "\n" not in str(e.value)
