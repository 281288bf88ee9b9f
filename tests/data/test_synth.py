"""The built-in synthetic dataset: rendering, naming, determinism, every format."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain.data.detect import detect_format, open_collection
from finegrain.data.synth import class_names_for, make_synthetic, render
from finegrain.errors import DataError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_class_names_readable_and_unique():
    names = class_names_for(16)
    assert len(names) == len(set(names)) == 16
    assert all(len(n.split()) == 3 for n in names)
    assert names[0].endswith(" 01") and names[15].endswith(" 16")
    big = class_names_for(196)
    assert len(set(big)) == 196 and big[-1].endswith(" 196")


@pytest.mark.parametrize("size", [(64, 64), (48, 96), (96, 48), (16, 16)])
def test_render_size_and_bbox_inside(size):
    H, W = size
    for label in range(16):
        for i in range(3):
            im, (x1, y1, x2, y2) = render(label, 16, size, np.random.default_rng([label, i]))
            assert im.mode == "RGB" and im.size == (W, H)
            assert 0 <= x1 < x2 <= W - 1 and 0 <= y1 < y2 <= H - 1
            # the object is large enough to see and not the whole image
            assert (x2 - x1 + 1) >= 0.3 * W


def test_render_bbox_is_tight_around_the_object():
    """Pixels outside the box are background: rendering the same rng without the
    object is not possible, so check the box against the object's dark wheels."""
    im, (x1, y1, x2, y2) = render(3, 16, (96, 128), np.random.default_rng(7))
    a = np.asarray(im).astype(int)
    dark = a.max(axis=2) < 45
    ys, xs = np.nonzero(dark[y1 : y2 + 1, x1 : x2 + 1])
    assert ys.size > 0  # wheels inside the box
    # the box's lower part holds the wheels
    assert ys.max() > 0.6 * (y2 - y1)


def test_render_deterministic_and_varied():
    a, box_a = render(5, 16, (64, 64), np.random.default_rng(1))
    b, box_b = render(5, 16, (64, 64), np.random.default_rng(1))
    c, box_c = render(5, 16, (64, 64), np.random.default_rng(2))
    assert a.tobytes() == b.tobytes() and box_a == box_b
    assert a.tobytes() != c.tobytes()


def test_classes_differ_in_colour_shape_and_pattern():
    """Neighbouring labels share a colour; labels one hue-group apart do not."""
    names = class_names_for(16)
    colour = [n.split()[0] for n in names]
    body = [n.split()[1] for n in names]
    assert colour[0] == colour[1] == colour[2] == colour[3]
    assert colour[0] != colour[4]
    assert body[0] == body[1] and body[0] != body[2]


def test_small_sets_differ_by_colour():
    names = class_names_for(4)
    assert len({n.split()[0] for n in names}) == 4


def test_render_rejects_bad_label():
    with pytest.raises(DataError):
        render(16, 16, (64, 64), np.random.default_rng(0))


@pytest.mark.parametrize(
    "format,layout",
    [
        ("stanford_cars", "devkit"),
        ("stanford_cars", "all_images"),
        ("stanford_cars", "kaggle"),
        ("tiny_imagenet", "devkit"),
        ("image_folder", "devkit"),
    ],
)
def test_written_dataset_opens(tmp_path, format, layout):
    root = make_synthetic(
        tmp_path / "ds",
        format=format,
        num_classes=5,
        train_per_class=4,
        test_per_class=2,
        size=(40, 56),
        seed=3,
        layout=layout,
    )
    assert root == tmp_path / "ds"
    assert detect_format(root) == format
    col = open_collection(root)
    assert col.format == format
    assert col.num_classes == 5
    assert sorted(col.class_names) == sorted(class_names_for(5))
    assert len(col.splits["train"]) == 20 and len(col.splits["test"]) == 10
    assert not col.missing
    by_label = {}
    for r in col.all_records():
        by_label[r.label] = by_label.get(r.label, 0) + 1
        with Image.open(r.path) as im:
            assert im.size == (56, 40)
        if format != "image_folder":
            x1, y1, x2, y2 = r.bbox
            assert 0 <= x1 < x2 <= 55 and 0 <= y1 < y2 <= 39
    assert sorted(by_label.values()) == [6] * 5


def test_bboxes_survive_the_round_trip(tmp_path):
    """The boxes on disk (1-based in the devkit) read back as the rendered 0-based boxes."""
    make_synthetic(
        tmp_path / "a",
        format="stanford_cars",
        num_classes=3,
        train_per_class=2,
        test_per_class=1,
        size=(48, 64),
        seed=11,
    )
    col = open_collection(tmp_path / "a")
    expected = [
        render(label, 3, (48, 64), np.random.default_rng([11, 1, label, i]))[1] for i in range(2) for label in range(3)
    ]
    assert [r.bbox for r in col.splits["train"]] == expected


@pytest.mark.parametrize("format", ["stanford_cars", "tiny_imagenet", "image_folder"])
def test_same_seed_same_bytes(tmp_path, format):
    kw = dict(format=format, num_classes=4, train_per_class=3, test_per_class=2, size=(32, 48))
    make_synthetic(tmp_path / "a", seed=0, **kw)
    if format == "stanford_cars":
        time.sleep(1.1)  # the .mat headers carry no timestamp: prove it across a second boundary
    make_synthetic(tmp_path / "b", seed=0, **kw)
    make_synthetic(tmp_path / "c", seed=1, **kw)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a.keys() == b.keys() and a == b
    images = [k for k in a if k.lower().endswith((".jpg", ".jpeg", ".png"))]
    assert images and all(a[k] != c[k] for k in images)


def test_rewrite_replaces_earlier_synthetic_dataset(tmp_path):
    root = tmp_path / "ds"
    make_synthetic(root, format="image_folder", num_classes=6, train_per_class=2, test_per_class=1)
    make_synthetic(root, format="image_folder", num_classes=3, train_per_class=2, test_per_class=1)
    assert open_collection(root).num_classes == 3


def test_refuses_non_empty_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        make_synthetic(tmp_path, num_classes=2, train_per_class=1, test_per_class=1)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="format"):
        make_synthetic(tmp_path / "x", format="coco")
    with pytest.raises(DataError, match="layout"):
        make_synthetic(tmp_path / "y", layout="weird")
    with pytest.raises(DataError, match="classes"):
        make_synthetic(tmp_path / "z", num_classes=1)
