"""evaluate_run: the numbers, the protocol that produced them, and how the model was run."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from finegrain.data.module import split_for
from finegrain.errors import FinegrainError
from finegrain.retrieval.embeddings import load_embeddings
from finegrain.runs import open_run
from finegrain.tasks.evaluate import evaluate_run


@pytest.fixture
def run(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    return open_run(tmp_path / "run")


def test_classification_metrics_match_the_saved_outputs(run):
    m = evaluate_run(run.path, engine="torch")
    assert json.loads(run.metrics.read_text()) == json.loads(json.dumps(m))
    p = m["protocol"]
    assert p["protocol"] == "classification" and p["n_test"] == m["timing"]["n_images"] == 32
    assert m["inference"]["engine"] == "torch" and m["inference"]["sizes"] == [[32, 32]]
    assert m["machine"]["cpu_flags"] is not None and "auto_precision" in m["machine"]
    c = m["classification"]
    assert 0 <= c["top1"] <= c["top5"] <= 1 and c["prediction_seconds"] > 0
    from finegrain.inference.encoder import Encoder
    from finegrain.inference.load import load_model

    encoder = Encoder(load_model(run), precision="32")
    out = encoder.encode_records(split_for(encoder.cfg.data).test, description="test")
    preds = out.logits.argmax(1)
    assert c["top1"] == pytest.approx(float(np.mean(preds == out.labels)))
    with (run.path / "per_class.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == p["num_classes"]
    assert sum(int(r["support"]) for r in rows) == p["n_test"]
    for i, r in enumerate(rows):  # each class's recall is its share of correct arg-maxes
        mine = out.labels == i
        assert float(r["recall"]) == pytest.approx(float(np.mean(preds[mine] == i)) if mine.any() else 0.0, abs=1e-4)


def test_retrieval_protocol_on_a_classifier_uses_the_same_saved_vectors(run):
    m = evaluate_run(run.path, protocol="retrieval", engine="torch")
    r = m["retrieval"]
    assert 0 <= r["recall@1"] <= r["recall@2"] <= r["recall@4"] <= r["recall@8"] <= 1
    emb, labels, paths = load_embeddings(run, "test")
    assert len(labels) == m["protocol"]["n_test"] and emb.shape[0] == len(paths)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)  # recall@1 by hand, each query left out
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    assert r["recall@1"] == pytest.approx(float(np.mean(labels[sims.argmax(1)] == labels)))


def test_an_unknown_protocol_is_a_clear_error(run):
    with pytest.raises(FinegrainError, match="unknown protocol 'detection'"):
        evaluate_run(run.path, protocol="detection")


def test_knn_metrics_are_those_of_scikit_learns_kneighbors_on_the_saved_vectors(run, tmp_path):
    from sklearn.neighbors import KNeighborsClassifier

    from finegrain.config import build_config, config_to_yaml
    from finegrain.data.module import split_for
    from finegrain.inference import open_encoder

    cfg = build_config(
        {
            "name": "knn",
            "task": "knn",
            "eval": {"k": 3, "source_run": run.path.name},
            "data": run.load_config().data.model_dump(mode="json"),
            "model": {"backbone": "cars_cnn4"},
        }
    )
    knn_dir = run.path.parent / "knn"
    knn_dir.mkdir()
    (knn_dir / "config.yaml").write_text(config_to_yaml(cfg))
    m = evaluate_run(knn_dir, engine="torch")
    encoder = open_encoder(open_run(knn_dir), "torch")
    split = split_for(cfg.data)
    gallery = encoder.encode_records(split.train + split.val, description="gallery")
    test = encoder.encode_records(split.test, description="test")
    sk = KNeighborsClassifier(n_neighbors=3).fit(gallery.embeddings, gallery.labels)
    expected = float(np.mean(sk.predict(test.embeddings) == test.labels))
    assert m["classification"]["top1"] == pytest.approx(expected, abs=1 / len(test.labels) + 1e-9)
    assert "loss" not in m["classification"] and m["classification"]["n_gallery"] == len(gallery.labels)


def test_metrics_title_stays_one_line_in_a_log_file():
    import io

    from finegrain.cli.common import PipeConsole
    from finegrain.tasks.evaluate import render_metrics

    words = "a seeded (seed 0) stratified 20% holdout of the training images (40 images): the data has no test split"
    metrics = {
        "run": "classify",
        "protocol": {"protocol": "classification", "n_test": 40},
        "tested_on": {"words": words},
        "classification": {"top1": 0.55, "n": 40},
    }
    out = io.StringIO()  # not a terminal: as `finegrain train ... > log`
    PipeConsole(file=out).print(render_metrics(metrics))
    lines = out.getvalue().splitlines()
    assert f"classify: classification, tested on {words}" in [line.strip() for line in lines], lines
    assert any("top1" in line and "55.00%" in line for line in lines)
