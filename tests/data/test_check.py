from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from finegrain.data.check import check_dataset, render_check
from finegrain.data.folder import write_image_folder
from tests.data.conftest import make_samples


@pytest.fixture
def messy(tmp_path):
    """train/test folders with one of every problem."""
    write_image_folder(
        tmp_path,
        ["a", "b"],
        {
            "train": [(im, label) for im, label, _ in make_samples(2, 3, seed=1)],
            "test": [(im, label) for im, label, _ in make_samples(2, 2, seed=2)],
        },
    )
    a = tmp_path / "train" / "a"
    arr = np.full((16, 16, 3), 90, np.uint8)
    good = a / "good.jpg"
    Image.fromarray(arr).save(good, quality=95)
    data = good.read_bytes()
    (a / "corrupt.jpg").write_bytes(data[:200] + bytes(range(256)) * 4)  # valid header, garbage body
    (a / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (a / "zero.jpg").write_bytes(b"")
    (a / "text.jpg").write_text("hello, I am not a picture\n")
    Image.fromarray(np.zeros((16, 16, 4), np.uint8), "RGBA").save(a / "alpha.png")
    Image.new("CMYK", (16, 16), (10, 20, 30, 40)).save(a / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(a / "deep.png")
    Image.new("L", (16, 16), 128).save(a / "grey.jpg")
    shutil.copy(tmp_path / "train" / "b" / "4.png", tmp_path / "test" / "b" / "copy.png")
    return tmp_path


def test_check_reports_every_problem(messy):
    rep = check_dataset(messy, progress=False)
    assert rep.format == "image_folder" and rep.num_classes == 2
    bad = {b.path.name: b.reason for b in rep.bad_files}
    assert bad["zero.jpg"] == "empty"
    assert bad["text.jpg"] == "not-an-image"
    assert bad["corrupt.jpg"] in ("corrupt", "truncated")
    assert bad["truncated.jpg"] == "truncated"
    assert "good.jpg" not in bad and len(bad) == 4
    conv = {k: {p.name for p in v} for k, v in rep.conversions.items()}
    assert conv == {"alpha": {"alpha.png"}, "cmyk": {"cmyk.jpg"}, "16-bit": {"deep.png"}, "greyscale": {"grey.jpg"}}
    assert [(a.name, b.name) for a, b in rep.duplicates] == [("4.png", "copy.png")]
    assert rep.images == {"train": 15, "test": 5}
    assert not rep.ok
    text = _render(rep)
    assert "zero.jpg" in text and "copy.png" in text and "PROBLEMS" in text


def test_clean_dataset_is_ok(tmp_path):
    write_image_folder(
        tmp_path,
        ["a", "b"],
        {
            "train": [(im, label) for im, label, _ in make_samples(2, 2, seed=1)],
            "test": [(im, label) for im, label, _ in make_samples(2, 1, seed=2)],
        },
    )
    rep = check_dataset(tmp_path, progress=False)
    assert rep.ok and not rep.bad_files and not rep.duplicates and not rep.conversions
    assert "OK" in _render(rep)


def _render(rep) -> str:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(render_check(rep))
    return console.export_text()


@pytest.mark.realdata
def test_real_cars_check(real_cars):
    rep = check_dataset(real_cars, progress=False)
    assert rep.images == {"train": 8144} and rep.classes == {"train": 196} and rep.num_classes == 196
    assert rep.class_names[0] == "AM General Hummer SUV 2000"
    assert "cars_test" in rep.missing["test"]
    assert not rep.bad_files and rep.ok
    assert 0 < len(rep.conversions.get("greyscale", [])) < 100


@pytest.mark.realdata
def test_real_tiny_imagenet_check(real_tiny_imagenet):
    rep = check_dataset(real_tiny_imagenet, progress=False)
    assert rep.images == {"train": 20000, "test": 10000} and rep.num_classes == 200
    assert not rep.bad_files
    # The real data holds one byte-identical image in train (goose) and val (black stork).
    assert [(a.name, b.name) for a, b in rep.duplicates] == [("n01855672_44.JPEG", "val_2157.JPEG")]
