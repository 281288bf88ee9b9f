"""``finegrain evaluate``: a run's final numbers on its test split, with the protocol that produced them."""

from __future__ import annotations

import csv
import io
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from finegrain import __version__
from finegrain.config import ExperimentConfig
from finegrain.errors import FinegrainError
from finegrain.inference import open_encoder
from finegrain.machine import machine_info, tune_allocator
from finegrain.metrics.classification import classification_metrics, confusion_pairs, per_class_table
from finegrain.metrics.retrieval import retrieval_metrics
from finegrain.retrieval.embeddings import save_embeddings
from finegrain.retrieval.knn import knn_classify
from finegrain.runs import RunDir, atomic_write_json, atomic_write_text, open_run

log = logging.getLogger(__name__)

DEFINITIONS = {
    "top1": "fraction of test images whose highest-scoring class is the true class",
    "top5": "fraction of test images whose true class is among the 5 highest-scoring classes",
    "precision/recall/f1_macro": "scikit-learn, unweighted mean over all classes (zero_division=0)",
    "precision/recall/f1_weighted": "scikit-learn, mean over classes weighted by support "
    "(weighted recall equals top-1 accuracy by definition)",
    "loss": "mean cross-entropy of the softmax over the logits",
    "recall@k": "fraction of queries with at least one of their k nearest gallery images (query itself excluded) "
    "of the same class",
    "precision@1 / r_precision / map@r": "as in Musgrave et al. 2020 (A Metric Learning Reality Check) and "
    "pytorch-metric-learning's AccuracyCalculator",
    "prediction_seconds": "wall time of the model's forward passes (kNN: the neighbour search and vote) "
    "over all test images, excluding image decoding",
}


def protocol_of(cfg: ExperimentConfig, split, root: Path, protocol: str, collection_format: str) -> dict:
    # optional: torch, Lightning (the train extra), imported only when this runs
    from finegrain.data.module import eval_sizes

    return {
        "dataset": str(root),
        "format": collection_format,
        "protocol": protocol,
        "split": split.description,
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
        "num_classes": len(split.class_names),
        "image_size": list(eval_sizes(cfg.data)[0]),
        "train_image_size": list(cfg.data.image_size),
        "eval_image_sizes": [list(size) for size in eval_sizes(cfg.data)],
        "tta_flip": cfg.eval.tta_flip,
    }


def evaluate_run(
    run_path: str | Path, protocol: str | None = None, precision: str | None = None, engine: str = "auto"
) -> dict:
    """Evaluate a run on its test split and write ``metrics.json`` (and per-class CSV); ``engine``
    as :func:`finegrain.inference.open_encoder` takes it."""
    # optional: torch, Lightning (the train extra), imported only when this runs
    from finegrain.data.module import FinegrainDataModule, dataset_root

    run = open_run(run_path)
    tune_allocator()  # the evaluation's batches too (machine.ALLOCATOR_SETTINGS)
    encoder = open_encoder(run, engine, precision)
    loaded, cfg = encoder.loaded, encoder.cfg
    protocol = protocol or cfg.data.protocol
    if protocol not in ("classification", "retrieval"):
        raise FinegrainError(f"unknown protocol '{protocol}'; valid: classification, retrieval")
    dm = FinegrainDataModule(cfg)
    fmt = dm.collection_format
    result: dict = {
        "run": run.name,
        "task": cfg.task,
        "tested_on": dm.split.tested_on_record(),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "finegrain": __version__,
        "checkpoint": str(loaded.checkpoint),
        "model_checksum": loaded.checksum,
        "machine": machine_info(),
        "inference": encoder.signature(),
        "protocol": protocol_of(cfg, dm.split, dataset_root(cfg.data), protocol, fmt),
        "definitions": DEFINITIONS,
    }
    if phases := run.training_precision():
        result["training_precision"] = phases
    out = encoder.encode_records(dm.test_records, dm.caches, "test images")
    paths = [str(dm.test_records[i].path) for i in out.indices]
    save_embeddings(run, "test", out, paths, encoder)
    timing = {
        "n_images": int(len(out.labels)),
        "model_seconds": round(out.seconds, 4),
        "images_per_second": round(out.images_per_second, 2),
    }

    if protocol == "retrieval":
        add_retrieval_metrics(result, cfg, out, dm.split.test_source)
    else:
        add_classification_metrics(result, run, encoder, dm, out)
    result["timing"] = timing
    result.update(training_progress(run))
    write_metrics(run, result)
    return result


def add_retrieval_metrics(result: dict, cfg: ExperimentConfig, out, test_source: str) -> None:
    """``result["retrieval"]``: every test image queries the rest of the test set."""

    m = retrieval_metrics(out.embeddings, out.labels, ks=tuple(cfg.eval.recall_ks), metric="cosine")
    result["protocol"]["queries"] = "every test image"
    result["protocol"]["gallery"] = "the rest of the test set" + (
        " (class-disjoint from training)" if test_source == "held-out classes" else ""
    )
    result["retrieval"] = {
        k: (int(v) if isinstance(v, (int, np.integer)) else float(v) if isinstance(v, (float, np.floating)) else v)
        for k, v in m.items()
    }


def add_classification_metrics(result: dict, run: RunDir, encoder, dm, out) -> None:
    """``result["classification"]`` and ``confused_pairs`` (by the classifier head, else kNN), and per_class.csv."""
    cfg = encoder.cfg
    num_classes = len(dm.class_names)
    if out.logits is not None and cfg.predicts_with_classifier:
        t0 = time.perf_counter()
        preds = out.logits.argmax(1)
        m = classification_metrics(out.labels, out.logits, num_classes=num_classes, scores="logits")
        m["prediction_seconds"] = round(out.seconds + time.perf_counter() - t0, 4)
        result["protocol"]["method"] = "the classifier head's arg-max"
    else:
        m, preds = knn_metrics(encoder, dm, out)
        result["protocol"]["method"] = (
            f"kNN on {'embeddings' if cfg.model.has_embedder else 'features'}"
            f", k={cfg.eval.k}, {cfg.eval.metric}, {cfg.eval.weights} votes; "
            "gallery = train split, queries = test split"
        )
    result["classification"] = m
    table = per_class_table(out.labels, preds, dm.class_names)
    write_per_class(run, table)
    result["confused_pairs"] = [
        {"true": dm.class_names[t], "predicted": dm.class_names[p], "count": int(c)}
        for t, p, c in confusion_pairs(out.labels, preds, top=10)
    ]


def write_metrics(run: RunDir, result: dict) -> None:
    """Write metrics.json, and the DONE marker unless training had not finished (then remove it)."""
    if result["partial"]:  # an unfinished run's numbers: never DONE, so `experiments run` finishes it
        run.done_marker.unlink(missing_ok=True)
        log.warning(
            "%s has not finished training (%d of %d epochs): metrics.json is marked partial",
            run.path,
            result["epochs_done"],
            result["epochs_planned"],
        )
    atomic_write_json(run.metrics, result)
    if not result["partial"]:
        atomic_write_text(run.done_marker, result["evaluated_at"] + "\n")


def training_progress(run: RunDir) -> dict:
    """``partial`` (training did not reach its end), ``epochs_done``, ``epochs_planned``, ``stopped_early``."""
    state = run.training_state()
    return {
        "partial": state["status"] != "finished",
        "epochs_done": int(state["epochs_done"]),
        "epochs_planned": int(state["epochs_planned"]),
        "stopped_early": bool(state["stopped_early"]),
    }


def knn_metrics(encoder, dm, test_out) -> tuple[dict, np.ndarray]:
    """kNN classification: gallery = the train split's vectors, queries = the test split's."""

    gallery = encoder.encode_records(dm.split.train + dm.split.val, dm.caches, "gallery images")
    e = encoder.cfg.eval
    if e.k > len(gallery.labels):
        raise FinegrainError(f"eval.k={e.k} is larger than the gallery ({len(gallery.labels)} images)")
    preds, scores, seconds = knn_classify(
        gallery.embeddings,
        gallery.labels,
        test_out.embeddings,
        k=e.k,
        metric=e.metric,
        weights=e.weights,
        num_classes=len(dm.class_names),
    )
    m = classification_metrics(test_out.labels, scores, num_classes=len(dm.class_names), scores="probs")
    # Vote shares are no probability model: their cross-entropy mostly counts the classes no neighbour
    # voted for (clipped zeros), so a kNN row reports no loss, as the seed's kNN table did.
    m.pop("loss", None)
    m["prediction_seconds"] = round(float(seconds), 6)
    m["n_gallery"] = int(len(gallery.labels))
    return m, preds


def write_per_class(run: RunDir, table: list[dict]) -> None:
    if not table:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(table[0]))
    w.writeheader()
    w.writerows(table)
    atomic_write_text(run.path / "per_class.csv", buf.getvalue())


def render_metrics(metrics: dict) -> Group:
    """The headline numbers: a title line (not a table title, which rich folds to the narrow
    table's width) and a rich table."""

    partial = (
        (f" [PARTIAL: training stopped after {metrics.get('epochs_done')} of {metrics.get('epochs_planned')} epochs]")
        if metrics.get("partial")
        else ""
    )
    tested = (metrics.get("tested_on") or {}).get("words") or f"{metrics['protocol']['n_test']} test images"
    title = Text(f"{metrics['run']}: {metrics['protocol']['protocol']}, tested on {tested}{partial}", style="italic")
    table = Table(show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    section = metrics.get("classification") or metrics.get("retrieval") or {}
    for k, v in section.items():
        if isinstance(v, float):
            shown = f"{v:.4f}" if ("loss" in k or "seconds" in k) else f"{100 * v:.2f}%"
            table.add_row(k, shown)
        elif isinstance(v, int):
            table.add_row(k, str(v))
    t = metrics.get("timing", {})
    if t:
        table.add_row("images/s (model)", f"{t['images_per_second']:.1f}")
    return Group(title, table)
