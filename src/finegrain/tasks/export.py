"""``finegrain export RUN [--format onnx] [--quantize int8]``: the run's model as an ONNX file that
ONNX Runtime serves without PyTorch, with a JSON beside it saying what it was made from.

``--quantize int8`` adds ``model.int8.onnx`` (static quantization calibrated on training images)
and records the accuracy it loses: both ONNX models evaluated on the test split by the same code.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
from datetime import UTC, datetime
from pathlib import Path

from finegrain import __version__
from finegrain.errors import FinegrainError
from finegrain.inference.load import file_sha256, load_model
from finegrain.inference.onnx_engine import (
    EXPORT_DIR,
    FP32_FILE,
    INT8_FILE,
    META_FILE,
    OnnxEncoder,
    onnxruntime_version,
)
from finegrain.inference.outputs import eval_sizes
from finegrain.metrics.classification import classification_metrics
from finegrain.metrics.retrieval import retrieval_metrics
from finegrain.runs import (
    atomic_write_bytes,
    atomic_write_json,
    clean_stale_tmp,
    human_bytes,
    open_run,
)
from finegrain.tasks.evaluate import knn_metrics

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
QUANTIZATIONS = ("int8",)
DEFAULT_CALIBRATION_IMAGES = 300


def headline_accuracy(encoder, cfg) -> dict:
    """The run's headline test number on ``encoder``, computed as ``finegrain evaluate`` computes it:
    top-1 of the classifier head (or of the kNN vote without one), or Recall@1 for retrieval."""
    # optional: torch, Lightning (the train extra), imported only when this runs
    from finegrain.data.module import FinegrainDataModule

    dm = FinegrainDataModule(cfg)
    out = encoder.encode_records(dm.test_records, dm.caches, f"test images ({encoder.engine} {encoder.precision})")
    if cfg.data.protocol == "retrieval":
        m = retrieval_metrics(out.embeddings, out.labels, ks=tuple(cfg.eval.recall_ks), metric="cosine")
        return {"metric": "recall@1", "value": float(m["recall@1"]), "n_images": len(out.labels)}
    if out.logits is not None and cfg.predicts_with_classifier:
        m = classification_metrics(out.labels, out.logits, num_classes=len(dm.class_names), scores="logits")
    else:
        m, _ = knn_metrics(encoder, dm, out)
    return {"metric": "top1", "value": float(m["top1"]), "n_images": len(out.labels)}


class CalibrationSample:
    """uint8 batches of up to ``n_images`` training images (seeded sample), at every evaluation size,
    decoded by the evaluation loaders (the pixels inference sees); ``images`` counts the distinct
    readable images that were fed."""

    def __init__(self, cfg, n_images: int, seed: int = 0) -> None:
        # optional: torch, Lightning (the train extra), imported only when this runs
        from finegrain.data.module import FinegrainDataModule

        self.cfg = cfg
        self.dm = FinegrainDataModule(cfg)
        records = list(self.dm.train_records) or list(self.dm.split.train)
        if not records:
            raise FinegrainError("the run's dataset has no training images to calibrate int8 quantization on")
        self.records = random.Random(seed).sample(records, min(n_images, len(records)))
        self._seen: set[int] = set()

    @property
    def images(self) -> int:
        return len(self._seen)

    def __iter__(self):
        # optional: torch, Lightning (the train extra), imported only when this runs
        from finegrain.data.module import eval_loaders

        for loader in eval_loaders(self.records, self.cfg.data, self.dm.caches):
            for batch in loader:
                if batch is not None:
                    self._seen.update(int(i) for i in batch[2])
                    yield batch[0].numpy()


def check_request(fmt: str, quantize: str | None, calibration_images: int) -> None:
    """Refuse an unknown format or quantization, or fewer than one calibration image."""
    if fmt not in FORMATS:
        raise FinegrainError(f"unknown export format '{fmt}'; valid: {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise FinegrainError(f"unknown quantization '{quantize}'; valid: {', '.join(QUANTIZATIONS)}")
    if calibration_images < 1:
        raise FinegrainError(f"--calibration-images must be at least 1; got {calibration_images}")


def open_exportable(run_path: str | Path):
    """The run, once it has a checkpoint and the onnx package is installed."""
    run = open_run(run_path)
    if not run.best_ckpt.is_file() and not run.last_ckpt.is_file():
        raise FinegrainError(
            f"{run.path}: no checkpoint in {run.checkpoints} to export "
            "(train it first; a kNN run trains nothing: export its source run)"
        )
    try:
        import onnx  # noqa: F401 - torch's exporter writes through it
    except ImportError:
        raise FinegrainError("exporting needs the onnx package: pip install 'finegrain[train]' (or onnx)") from None
    return run


def export_metadata(run, loaded, sizes, opset: int, data: bytes, parity) -> dict:
    """model.json's contents for the fp32 model: what it was made from, its input and outputs, its parity."""
    # optional: torch (the train extra), imported only when this runs
    import torch

    # torch (the train extra), behind the exporter
    from finegrain.inference.export import has_maps, output_names

    cfg = loaded.cfg
    return {
        "format": "onnx",
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "finegrain": __version__,
        "run": run.name,
        "checkpoint": str(loaded.checkpoint.relative_to(run.path))
        if loaded.checkpoint.is_relative_to(run.path)
        else str(loaded.checkpoint),
        "model_checksum": loaded.checksum,
        "task": cfg.task,
        "backbone": cfg.model.backbone,
        "has_classifier": loaded.has_classifier,
        "class_names": loaded.class_names,
        "image_sizes": [list(s) for s in sizes],
        "tta_flip": cfg.eval.tta_flip,
        "input": {
            "name": "images",
            "dtype": "uint8",
            "shape": ["batch", 3, "height", "width"],
            "values": "RGB 0-255; the graph normalises them",
        },
        "outputs": output_names(loaded),
        "maps": has_maps(loaded),  # False: the backbone gives none (an older export has no entry)
        "dynamic_axes": ["batch", "height", "width"],
        "opset": opset,
        "onnxruntime": onnxruntime_version(),
        "torch": torch.__version__,
        "parity": {"max_abs_diff": parity, "what": "every output, random uint8 images at every size, vs PyTorch fp32"},
        "files": {"fp32": {"file": FP32_FILE, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
        "config": cfg.model_dump(mode="json"),
    }


def add_int8(run, meta: dict, dest: Path, cfg, calibration_images: int) -> None:
    """Write ``model.int8.onnx`` and record it and the test accuracy it loses against fp32 in ``meta``."""
    # optional: torch (the train extra), imported only when this runs
    from finegrain.inference.export import quantize_int8

    fp32 = dest / FP32_FILE
    sample = CalibrationSample(cfg, calibration_images)
    how = quantize_int8(fp32, dest / INT8_FILE, sample)
    how["calibration_images"] = sample.images

    int8 = dest / INT8_FILE
    meta["files"]["int8"] = {
        "file": INT8_FILE,
        "sha256": file_sha256(int8),
        "bytes": int8.stat().st_size,
        "quantization": how,
    }
    atomic_write_json(dest / META_FILE, meta)  # the encoders below read it
    fp32_acc = headline_accuracy(OnnxEncoder(run, meta, "32"), cfg)
    int8_acc = headline_accuracy(OnnxEncoder(run, meta, "int8"), cfg)
    meta["accuracy"] = {
        "split": "test",
        "metric": fp32_acc["metric"],
        "n_images": fp32_acc["n_images"],
        "fp32": fp32_acc["value"],
        "int8": int8_acc["value"],
        "int8_drop": round(fp32_acc["value"] - int8_acc["value"], 10),
        "how": "both ONNX models evaluated on the test split by the code of `finegrain evaluate`",
    }


def export_run(
    run_path: str | Path,
    fmt: str = "onnx",
    quantize: str | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    opset: int | None = None,
) -> dict:
    """Write ``RUN/export/model.onnx`` (+ ``model.int8.onnx`` with ``quantize="int8"``) and
    ``RUN/export/model.json``; returns the JSON's contents."""
    check_request(fmt, quantize, calibration_images)
    run = open_exportable(run_path)

    # optional: torch (the train extra), imported only when this runs
    from finegrain.inference.export import DEFAULT_OPSET, check_parity, export_onnx

    opset = opset or DEFAULT_OPSET
    loaded = load_model(run)
    cfg = loaded.cfg
    sizes = eval_sizes(cfg.data)
    dest = run.path / EXPORT_DIR
    dest.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(dest)  # a killed export's unfinished model file, and its quantization folder
    for stale in dest.glob(".quant-*"):
        shutil.rmtree(stale, ignore_errors=True)
    data = export_onnx(loaded, sizes[0], opset)
    fp32 = dest / FP32_FILE
    atomic_write_bytes(fp32, data)
    parity = check_parity(fp32, loaded, sizes)
    meta = export_metadata(run, loaded, sizes, opset, data, parity)
    stale_int8 = dest / INT8_FILE
    if quantize == "int8":
        add_int8(run, meta, dest, cfg, calibration_images)
    atomic_write_json(dest / META_FILE, meta)
    if quantize is None and stale_int8.is_file():
        stale_int8.unlink()  # an int8 model of an earlier export: not of this one
    return meta


def render_export(meta: dict, run_path: Path) -> list[str]:
    """Lines for the terminal."""
    dest = Path(run_path) / EXPORT_DIR
    sizes = ", ".join(f"{h}x{w}" for h, w in meta["image_sizes"])
    lines = [
        f"exported {meta['backbone']} to {dest / meta['files']['fp32']['file']} "
        f"({human_bytes(meta['files']['fp32']['bytes'])}, opset {meta['opset']}, sizes {sizes}); "
        f"max difference to PyTorch {meta['parity']['max_abs_diff']:.2g}"
    ]
    if "int8" in meta["files"]:
        acc = meta["accuracy"]
        int8 = meta["files"]["int8"]
        lines.append(
            f"int8: {dest / int8['file']} ({human_bytes(int8['bytes'])}, "
            f"{int8['quantization']['calibration_images']} calibration images); test "
            f"{acc['metric']} {acc['fp32']:.4f} in fp32, {acc['int8']:.4f} in int8 "
            f"(drop {acc['int8_drop']:+.4f})"
        )
    lines.append(f"described in {dest / META_FILE}")
    return lines
