"""Reports: comparison tables, figures and the self-contained HTML pages, on fabricated run directories."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from finegrain.config import build_config, config_to_yaml
from finegrain.report import figures
from finegrain.report.html import definition_for, report_is_current, write_multi_report, write_report
from finegrain.report.tables import comparison_rows, html_table, markdown_table

CLASS_NAMES = [
    "AM General Hummer SUV 2000",
    "Acura RL Sedan 2012",
    "Audi S4 Sedan 2012",
    "Audi A4 Sedan 2007",
    "BMW M3 Coupe 2012",
    "Chevrolet Silverado 2500HD Regular Cab 2012",
]
COLORS = [(200, 40, 40), (40, 160, 40), (40, 60, 200), (200, 160, 30), (140, 40, 160), (30, 160, 170)]


def write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def write_images(folder: Path, n_per_class: int, n_classes: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Small images, one folder per class: a coloured 'car' on a grey background."""
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for c in range(n_classes):
        d = folder / CLASS_NAMES[c]
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            im = Image.new("RGB", (64, 48), tuple(int(v) for v in rng.integers(150, 230, 3)))
            draw = ImageDraw.Draw(im)
            x = int(rng.integers(2, 20))
            draw.rectangle([x, 18, x + 40, 34], fill=COLORS[c])
            draw.ellipse([x + 4, 30, x + 14, 40], fill=(20, 20, 20))
            draw.ellipse([x + 28, 30, x + 38, 40], fill=(20, 20, 20))
            p = d / f"{i:03d}.jpg"
            im.save(p, quality=90)
            paths.append(str(p))
            labels.append(c)
    return paths, np.array(labels)


def fake_embeddings(labels: np.ndarray, dim: int = 16, noise: float = 0.6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(int(labels.max()) + 1, dim))
    return (centres[labels] + noise * rng.normal(size=(len(labels), dim))).astype(np.float32)


def make_classification_run(
    root: Path, name: str = "cls-run", epochs: int = 6, history: bool = True, n_per_class: int = 4
) -> Path:
    run = root / name
    (run / "embeddings").mkdir(parents=True)
    cfg = build_config(
        {
            "name": name,
            "description": "ResNet-50 fine-tuned, augmentation, dropout 0.5",
            "model": {"backbone": "resnet50", "weights": "imagenet", "dropout": 0.5},
            "data": {"root": "data/stanford_cars", "augment": "seed", "batch_size": 32},
            "optim": {"name": "adam", "lr": 0.001},
            "schedule": {"name": "step", "step_size": 7},
            "train": {"epochs": epochs},
        }
    )
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    n_classes = len(CLASS_NAMES)
    if history:
        write_csv(
            run / "history.csv",
            [
                {
                    "epoch": e,
                    "step": 10 * e,
                    "train/acc": round(min(0.99, 0.2 + 0.12 * e), 4),
                    "train/loss": round(2.5 / e, 4),
                    "val/acc": round(min(0.8, 0.15 + 0.1 * e), 4),
                    "val/loss": round(2.7 / e**0.7, 4),
                    "lr/backbone": 1e-4 * (0.1 if e > 4 else 1),
                    "lr/head": 1e-3 * (0.1 if e > 4 else 1),
                    "seconds": 12.5,
                }
                for e in range(1, epochs + 1)
            ],
        )
    paths, labels = write_images(run.parent / f"{name}-images", n_per_class, n_classes)
    np.savez(run / "embeddings" / "test.npz", embeddings=fake_embeddings(labels), labels=labels, paths=np.array(paths))
    per_class = []
    for c, cname in enumerate(CLASS_NAMES):
        correct = n_per_class - (c % 3)
        per_class.append(
            {
                "class": cname,
                "support": n_per_class,
                "correct": correct,
                "accuracy": correct / n_per_class,
                "precision": 0.7,
                "recall": correct / n_per_class,
                "f1": 0.66,
            }
        )
    write_csv(run / "per_class.csv", per_class)
    metrics = {
        "run": name,
        "task": "classification",
        "evaluated_at": "2025-01-01T00:00:00+00:00",
        "checkpoint": str(run / "checkpoints" / "best.ckpt"),
        "model_checksum": "ab" * 32,
        "machine": {"platform": "Linux", "cpus": 2, "cuda": False},
        "protocol": {
            "dataset": "data/stanford_cars",
            "format": "stanford_cars_devkit",
            "protocol": "classification",
            "split": "Classification on stanford_cars_devkit (6 classes): train = the official train split "
            "minus val (40 images); test = the official test split (24 images).",
            "n_train": 40,
            "n_val": 4,
            "n_test": 24,
            "num_classes": n_classes,
            "image_size": [224, 224],
            "tta_flip": False,
            "method": "the classifier head's arg-max",
        },
        "definitions": {
            "top1": "fraction of test images whose highest-scoring class is the true class",
            "precision/recall/f1_macro": "scikit-learn, unweighted mean over all classes",
            "loss": "mean cross-entropy",
        },
        "classification": {
            "top1": 0.7378,
            "top5": 0.9512,
            "loss": 0.90123,
            "precision_macro": 0.7818,
            "recall_macro": 0.7366,
            "f1_macro": 0.7363,
            "precision_weighted": 0.78,
            "recall_weighted": 0.7378,
            "f1_weighted": 0.735,
            "n": 24,
            "prediction_seconds": 1.19984,
        },
        "confused_pairs": [
            {"true": CLASS_NAMES[2], "predicted": CLASS_NAMES[3], "count": 3},
            {"true": CLASS_NAMES[5], "predicted": CLASS_NAMES[0], "count": 2},
            {"true": "a class with no images", "predicted": CLASS_NAMES[1], "count": 1},
        ],
        "timing": {"n_images": 24, "model_seconds": 1.1, "images_per_second": 21.8},
    }
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run / "DONE").write_text("2025-01-01\n")
    return run


def make_retrieval_run(root: Path, name: str = "ret-run") -> Path:
    run = root / name
    (run / "embeddings").mkdir(parents=True)
    cfg = build_config(
        {
            "name": name,
            "description": "CUBS-ResNet-2 + multi-similarity loss",
            "task": "metric_learning",
            "data": {"root": "data/stanford_cars", "protocol": "retrieval", "sampler": "m_per_class"},
            "model": {"backbone": "resnet18", "head": "embedding", "embedding_dim": 512},
            "loss": {"name": "multi_similarity"},
            "train": {"epochs": 3},
        }
    )
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    write_csv(
        run / "history.csv",
        [
            {
                "epoch": e,
                "step": 5 * e,
                "train/loss": 1.0 / e,
                "val/recall@1": 0.1 * e,
                "val/map@r": 0.03 * e,
                "lr/0": 1e-4,
                "seconds": 3.0,
            }
            for e in range(1, 4)
        ],
    )
    paths, labels = write_images(run.parent / f"{name}-images", 3, 4, seed=1)
    paths[0] = str(run.parent / "gone" / "missing.jpg")  # a deleted image: drawn as a placeholder
    np.savez(
        run / "embeddings" / "test.npz",
        embeddings=fake_embeddings(labels, seed=1),
        labels=labels,
        paths=np.array(paths),
    )
    metrics = {
        "run": name,
        "task": "metric_learning",
        "evaluated_at": "2025-01-01T00:00:00+00:00",
        "protocol": {
            "dataset": "/data/stanford_cars/",
            "format": "stanford_cars_all",
            "protocol": "retrieval",
            "split": "Class-disjoint retrieval on stanford_cars_all: classes 1-98 are train; classes 99-196 are test",
            "n_train": 8054,
            "n_val": 0,
            "n_test": 8131,
            "num_classes": 196,
            "image_size": [224, 224],
            "tta_flip": True,
            "queries": "every test image",
            "gallery": "the rest of the test set (class-disjoint from training)",
        },
        "definitions": {
            "recall@k": "fraction of queries with a same-class neighbour among k",
            "precision@1 / r_precision / map@r": "as in Musgrave et al. 2020",
        },
        "retrieval": {
            "recall@1": 0.5123,
            "recall@2": 0.6456,
            "recall@4": 0.7589,
            "recall@8": 0.8512,
            "precision@1": 0.5123,
            "r_precision": 0.2,
            "map@r": 0.1234,
            "nmi": 0.55,
            "n_queries": 8131,
        },
        "timing": {"n_images": 12, "model_seconds": 0.5, "images_per_second": 24.0},
    }
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run / "DONE").write_text("2025-01-01\n")
    return run


def assert_png(path: Path, min_w: int = 300, min_h: int = 200) -> tuple[int, int]:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert min_w <= w <= 4000 and min_h <= h <= 4000, (w, h)
    return w, h


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two finished runs, built once (tests only add report/ folders to them)."""
    root = tmp_path_factory.mktemp("runs")
    return {"cls": make_classification_run(root), "ret": make_retrieval_run(root)}


# ---------------------------------------------------------------- tables


def test_comparison_rows_values(runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    rows = comparison_rows([runs["cls"], unfinished, runs["ret"]])
    assert [r["name"] for r in rows] == ["cls-run", "ret-run"]
    c, r = rows
    assert c["task"] == "classification" and r["task"] == "metric_learning"
    assert c["description"].startswith("ResNet-50 fine-tuned")
    assert c["data"] == "stanford_cars (stanford_cars_devkit)"
    assert r["data"] == "stanford_cars (stanford_cars_all)"
    assert c["accuracy"] == pytest.approx(0.7378) and c["f1"] == pytest.approx(0.7363)
    assert c["precision"] == pytest.approx(0.7818) and c["recall"] == pytest.approx(0.7366)
    assert c["loss"] == pytest.approx(0.90123) and c["prediction_seconds"] == pytest.approx(1.19984)
    assert all(c[f"recall@{k}"] is None for k in (1, 2, 4, 8)) and c["map@r"] is None
    assert r["accuracy"] is None and r["loss"] is None and r["f1"] is None
    assert r["recall@1"] == pytest.approx(0.5123) and r["recall@8"] == pytest.approx(0.8512)
    assert r["map@r"] == pytest.approx(0.1234)
    assert c["report"] == "cls-run/report/index.html"
    assert "official test split" in c["protocol"] and "arg-max" in c["protocol"]
    assert "Class-disjoint" in r["protocol"] and "every test image" in r["protocol"]
    assert "flip" in r["protocol"]


def test_markdown_table(runs):
    md = markdown_table(comparison_rows([runs["cls"], runs["ret"]]), title="Seed 000")
    assert md.startswith("# Seed 000")
    header = "| Model | Loss | Accuracy | F1 | Precision | Recall | Prediction time (s) | Tested on |"
    assert header in md
    assert "| Model | Recall@1 | Recall@2 | Recall@4 | Recall@8 | MAP@R | Tested on |" in md
    cls_line = next(line for line in md.splitlines() if line.startswith("| **cls-run**"))
    assert cls_line.split(" | ")[1:] == ["0.901", "73.8%", "73.6%", "78.2%", "73.7%", "1.200", "not recorded |"]
    ret_line = next(line for line in md.splitlines() if line.startswith("| **ret-run**"))
    assert ret_line.split(" | ")[1:] == ["51.2%", "64.6%", "75.9%", "85.1%", "12.3%", "not recorded |"]
    # the retrieval run has no classification numbers, so it is not in the first table
    assert md.count("**ret-run**") == 2  # retrieval table row + its protocol line
    assert md.count("**Data and protocol**") == 2
    assert "- **cls-run** (classification): data stanford_cars (stanford_cars_devkit)." in md
    # every table line has the same number of cells as its header
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        assert len({ln.count(" | ") for ln in lines if not ln.startswith("|:")}) <= 1


def test_missing_values_are_dashes(tmp_path):
    run = make_classification_run(tmp_path, "partial")
    m = json.loads((run / "metrics.json").read_text())
    del m["classification"]["loss"], m["classification"]["prediction_seconds"]
    (run / "metrics.json").write_text(json.dumps(m))
    md = markdown_table(comparison_rows([run]))
    line = next(ln for ln in md.splitlines() if ln.startswith("| **partial**"))
    assert line.split(" | ")[1] == "—" and line.endswith("| — | not recorded |")
    assert "## Retrieval" not in md


def test_html_table(runs):
    rows = comparison_rows([runs["cls"], runs["ret"]])
    page = html_table(rows, title="Seed <000>")
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "<title>Seed &lt;000&gt;</title>" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no external resources
    assert '<a href="cls-run/report/index.html">cls-run</a>' in page
    assert '<a href="ret-run/report/index.html">ret-run</a>' in page
    for value in ("0.901", "73.8%", "73.6%", "78.2%", "73.7%", "1.200", "51.2%", "64.6%", "75.9%", "85.1%", "12.3%"):
        assert f"<td>{value}</td>" in page, value
    assert page.count("Data and protocol") == 2


# ---------------------------------------------------------------- figures


def test_learning_curves_png(runs, tmp_path):
    w, h = assert_png(figures.learning_curves(runs["cls"] / "history.csv", tmp_path / "lc.png"))
    assert w > 2 * h  # three panels side by side
    assert_png(figures.learning_curves(runs["ret"] / "history.csv", tmp_path / "lc2.png"))


def test_learning_rate_groups_sharing_a_rate_are_drawn_once():
    cols = {
        "lr-AdamW/backbone": np.array([1e-3, 5e-4]),
        "lr-AdamW/head": np.array([1e-3, 5e-4]),
        "lr-AdamW/proxies": np.array([1e-1, 5e-2]),
        "lr-SGD/0": np.array([1e-3, 5e-4]),
    }
    assert figures._lr_series(list(cols), cols) == [
        ("lr-AdamW/backbone", "backbone, head and param group 0"),
        ("lr-AdamW/proxies", "proxies"),
    ]
    cols["lr-AdamW/head"] = np.array([2e-3, 1e-3])
    assert [label for _, label in figures._lr_series(list(cols), cols)] == [
        "backbone and param group 0",
        "head",
        "proxies",
    ]


def test_learning_curves_tolerates_missing_columns_and_cells(tmp_path):
    hist = tmp_path / "history.csv"
    write_csv(hist, [{"epoch": 1, "train/loss": 2.0, "val/acc": ""}, {"epoch": 2, "train/loss": 1.5, "val/acc": 0.4}])
    assert_png(figures.learning_curves(hist, tmp_path / "lc.png"), min_w=200)
    write_csv(hist, [{"epoch": 1, "seconds": 3}])
    with pytest.raises(ValueError):
        figures.learning_curves(hist, tmp_path / "none.png")


def test_learning_curves_caption_says_whether_the_run_validated(tmp_path):
    hist = tmp_path / "history.csv"
    write_csv(hist, [{"epoch": 1, "train/loss": 2.0, "val/acc": 0.3}, {"epoch": 2, "train/loss": 1.5, "val/acc": 0.4}])
    assert "validation metric" in figures.learning_curves_caption(hist)
    write_csv(
        hist, [{"epoch": 1, "train/loss": 2.0, "train/acc": 0.3}, {"epoch": 2, "train/loss": 1.5, "train/acc": 0.5}]
    )
    caption = figures.learning_curves_caption(hist)
    assert caption.startswith("Training loss and training accuracy per epoch") and "data.val_fraction: 0" in caption
    write_csv(
        hist,
        [{"epoch": 1, "train/loss": 2.0, "lr/backbone": 1e-3}, {"epoch": 2, "train/loss": 1.5, "lr/backbone": 5e-4}],
    )
    assert figures.learning_curves_caption(hist).startswith("Training loss and learning rate per epoch")
    assert "per epoch" in figures.learning_curves_caption(tmp_path / "missing.csv")


def test_per_class_accuracy_png(runs, tmp_path):
    assert_png(figures.per_class_accuracy(runs["cls"] / "per_class.csv", tmp_path / "pc.png"))
    # more classes than 2n: worst and best panels
    rows = [{"class": f"class {i}", "support": 10, "correct": i % 11, "accuracy": (i % 11) / 10} for i in range(40)]
    write_csv(tmp_path / "pc.csv", rows)
    w, h = assert_png(figures.per_class_accuracy(tmp_path / "pc.csv", tmp_path / "pc2.png", n=5))
    assert w > h


@pytest.mark.slow
def test_confused_pairs_and_gallery_png(runs, tmp_path):
    with np.load(runs["cls"] / "embeddings" / "test.npz") as z:
        emb, labels, paths = z["embeddings"], z["labels"], [str(p) for p in z["paths"]]
    pairs = json.loads((runs["cls"] / "metrics.json").read_text())["confused_pairs"]
    examples = {CLASS_NAMES[2]: [Path(p) for p in paths[8:10]], CLASS_NAMES[3]: [Path(paths[12]), tmp_path / "x.jpg"]}
    assert_png(figures.confused_pairs_figure(pairs, examples, tmp_path / "cp.png"))
    w, h = assert_png(figures.retrieval_gallery(emb, labels, paths, tmp_path / "g.png", class_names=CLASS_NAMES))
    assert h > w * 0.9  # 6 query rows of 6 images


def test_nearest_neighbours_exclude_self_and_rank_by_cosine():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], dtype=np.float32)
    idx, sims = figures.nearest_neighbours(emb, np.array([0, 2]), k=2)
    assert idx.tolist() == [[1, 2], [1, 0]]
    assert np.all(np.diff(sims, axis=1) <= 0)


def test_missing_image_is_a_placeholder(tmp_path):
    img = figures.load_thumb(tmp_path / "nope.jpg", 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert figures.load_thumb(tmp_path / "bad.jpg", 64).shape == (64, 64, 3)


# ---------------------------------------------------------------- HTML reports


def _data_uris(page: str) -> list[bytes]:
    import base64

    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.mark.slow
def test_write_report_classification(runs):
    out = write_report(runs["cls"])
    assert out == runs["cls"] / "report" / "index.html"
    page = out.read_text()
    pngs = _data_uris(page)
    assert len(pngs) == 4  # learning curves, confused pairs, per-class accuracy, retrieval gallery
    assert all(p.startswith(b"\x89PNG") for p in pngs)
    for name in ("learning_curves", "confused_pairs", "per_class_accuracy", "retrieval_gallery"):
        assert_png(runs["cls"] / "report" / f"{name}.png")
    for text in (
        "cls-run",
        "ResNet-50 fine-tuned, augmentation, dropout 0.5",
        "resnet50",
        "imagenet",
        "224×224",
        "adam",
        "0.001",
        "seed",
        "73.78%",
        "95.12%",
        "0.9012",
        "78.18%",
        "1.200 s",
        "official test split",
        "arg-max",
        "unweighted mean over all classes",
        "Audi S4 Sedan 2012",
        "Audi A4 Sedan 2007",
    ):
        assert text in page, text
    assert not re.search(r'(src|href)="(https?:)?//', page)


@pytest.mark.slow
def test_write_report_retrieval_without_per_class(runs):
    page = write_report(runs["ret"]).read_text()
    assert len(_data_uris(page)) == 2  # learning curves + retrieval gallery
    for text in ("51.23%", "85.12%", "12.34%", "every test image", "embedding", "multi_similarity"):
        assert text in page, text
    assert "Most confused" not in page


def test_write_report_without_history_or_embeddings(tmp_path):
    run = make_classification_run(tmp_path, "bare", history=False)
    (run / "embeddings" / "test.npz").unlink()
    page = write_report(run).read_text()
    assert "history.csv not found" in page and "embeddings/test.npz" in page
    assert len(_data_uris(page)) == 1  # only the per-class figure
    assert not (run / "report" / "learning_curves.png").exists()


def test_write_report_without_metrics(tmp_path):
    run = make_classification_run(tmp_path, "unevaluated")
    (run / "metrics.json").unlink()
    (run / "embeddings" / "test.npz").unlink()
    page = write_report(run).read_text()
    assert "metrics.json not found" in page
    assert "unevaluated" in page


@pytest.mark.slow
def test_multi_report(runs, tmp_path):
    root = runs["cls"].parent
    out = write_multi_report([runs["cls"], runs["ret"], tmp_path / "never-ran"], root / "index" / "all.html")
    page = out.read_text()
    assert report_is_current(runs["cls"]) and report_is_current(runs["ret"])
    assert '<a href="../cls-run/report/index.html">cls-run</a>' in page
    assert (runs["cls"] / "report" / "index.html").is_file() and (runs["ret"] / "report" / "index.html").is_file()
    assert len(_data_uris(page)) == 2  # a learning-curve thumbnail per run
    assert "73.8%" in page and "51.2%" in page and "never-ran" in page


def test_stale_report_is_rewritten(tmp_path):
    import os

    run = make_classification_run(tmp_path, "stale", history=False)
    (run / "embeddings" / "test.npz").unlink()
    write_report(run)
    assert report_is_current(run)
    page = run / "report" / "index.html"
    earlier = (run / "metrics.json").stat().st_mtime - 100
    os.utime(page, (earlier, earlier))  # as if metrics.json had been rewritten after the report
    assert not report_is_current(run)
    write_multi_report([run], tmp_path / "all.html")
    assert report_is_current(run)


def test_definition_lookup():
    defs = {
        "precision/recall/f1_macro": "macro",
        "precision@1 / r_precision / map@r": "musgrave",
        "recall@k": "rk",
        "top1": "t1",
    }
    assert definition_for("f1_macro", defs) == "macro"
    assert definition_for("map@r", defs) == "musgrave"
    assert definition_for("recall@4", defs) == "rk"
    assert definition_for("top1", defs) == "t1"
    assert definition_for("nmi", defs) == ""


def test_the_protocol_says_at_which_sizes_a_run_was_trained_and_tested():
    from finegrain.report.tables import protocol_words

    one = protocol_words({"image_size": [64, 64], "tta_flip": False})
    assert "Images resized to 64×64 (H×W)." in one and "tested at" not in one
    two = protocol_words(
        {
            "image_size": [192, 256],
            "train_image_size": [192, 256],
            "tta_flip": True,
            "eval_image_sizes": [[192, 256], [256, 341]],
        }
    )
    assert (
        "Images resized to 192×256 (H×W), tested at 192×256 and 256×341 (outputs averaged), "
        "horizontal-flip test-time augmentation."
    ) in two


def test_class_names_come_from_what_training_logged_when_there_is_no_per_class_csv(tmp_path):
    from finegrain.report.html import logged_class_names

    assert logged_class_names(tmp_path) is None
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "hparams.yaml").write_text(
        "config: {}\nclass_names:\n- AM General Hummer SUV 2000\n- Acura RL\n"
    )
    assert logged_class_names(tmp_path) == ["AM General Hummer SUV 2000", "Acura RL"]
    (tmp_path / "logs" / "hparams.yaml").write_text("class_names: [unclosed\n")
    assert logged_class_names(tmp_path) is None


@pytest.mark.slow
def test_report_names_the_cpu_and_how_the_model_ran(trained_run, tmp_path):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    page = write_report(run).read_text()
    assert metrics["machine"]["cpu"] in page
    assert f"native bf16 {'yes' if metrics['machine']['native_bf16'] else 'no'}" in page
    said = {"32": "fp32", "bf16-mixed": "bf16"}[metrics["inference"]["precision"]]  # as people say it, not "32"
    assert f"{metrics['inference']['engine']} engine, {said}</td>" in page


def test_the_settings_table_names_the_seed_and_the_regularisers():
    from finegrain.config import build_config
    from finegrain.report.run_sections import config_brief

    cfg = build_config(
        {
            "name": "x",
            "model": {"backbone": "efficientnet_lite0", "drop_path": 0.2, "global_pool": "avgmax"},
            "train": {"seed": 3, "cutmix": 1.0, "ema_decay": 0.99},
        }
    )
    rows = dict(config_brief(cfg, None))
    assert rows["seed"] == "3" and rows["backbone"].endswith("stochastic depth up to 0.2, avgmax pooling")
    assert rows["augmentation"].endswith("cutmix 1") and rows["optimiser"].endswith("(EMA, decay 0.99)")
    cosine = build_config({"name": "x", "model": {"backbone": "efficientnet_lite0", "head": "cosine", "dropout": 0.2}})
    assert dict(config_brief(cosine, None))["head"] == "cosine classifier, dropout 0.2"


def test_the_contact_sheet_titles_say_which_neighbour_is_the_query_itself(tmp_path):
    from PIL import Image

    from finegrain.report.contact_sheet import contact_sheet, hit_title
    from finegrain.retrieval.searcher import Hit

    img = tmp_path / "car.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    hits = [Hit(1, 0, "Audi A4", 1.0, str(img), same_image=True), Hit(2, 1, "Audi A5", 0.8, str(img))]
    assert hit_title(hits[0]).endswith("(the query itself)") and "Audi A4" in hit_title(hits[0])
    assert "query itself" not in hit_title(hits[1]) and "score 0.800" in hit_title(hits[1])
    long = hit_title(Hit(3, 2, "Chrysler Town and Country Minivan 2012", 0.7, str(img)))
    assert long.startswith("#3 Chrysler Town") and "…" in long and "Minivan 2012\n" in long  # the year kept
    out = contact_sheet(Image.open(img), hits, tmp_path / "sheet")
    assert out.suffix == ".png" and Image.open(out).size[0] > 0


def test_names_and_text_from_a_run_are_escaped_in_its_pages(tmp_path):
    """Class names, file names and descriptions are text: markup in them is shown, never run."""
    hostile = '<script>alert("x")</script>'
    run = make_classification_run(tmp_path, 'run"><b>bold', history=False)
    (run / "embeddings" / "test.npz").unlink()
    per_class = (run / "per_class.csv").read_text()
    (run / "per_class.csv").write_text(per_class.replace(CLASS_NAMES[2], hostile.replace('"', '""')))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["confused_pairs"][0]["true"] = hostile
    metrics["classification"]["top1"] = 0.5
    (run / "metrics.json").write_text(json.dumps(metrics))
    config = (run / "config.yaml").read_text()
    described = json.dumps("dropout 0.5 & " + hostile)  # a YAML double-quoted scalar
    (run / "config.yaml").write_text(re.sub(r"(?m)^description: .*$", f"description: {described}", config))
    pages = [write_report(run).read_text(), write_multi_report([run], tmp_path / "all.html").read_text()]
    pages.append(html_table(comparison_rows([run]), title=hostile))
    for page in pages:
        assert "<script" not in page.lower() and "<b>bold" not in page
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    report, index, table = pages
    assert f"<code>{tmp_path}/run&#34;&gt;&lt;b&gt;bold</code>" in report  # the run's folder in the footer
    assert 'href="run&#34;&gt;&lt;b&gt;bold/report/index.html"' in index  # a link stays one attribute
    assert "dropout 0.5 &amp; &lt;script&gt;" in report
    assert "<title>&lt;script&gt;" in table
