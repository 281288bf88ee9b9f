"""Saved embeddings of a run's splits: ``embeddings/<split>.npz`` and a JSON sidecar saying how
they were made (model checksum, sizes, flip averaging, precision, engine). They are reused only
when every one of these matches and the images are the same."""

from __future__ import annotations

import io
import json

import numpy as np

from finegrain.data.records import ImageRecord
from finegrain.errors import FinegrainError
from finegrain.inference.outputs import EncodingLoop, Outputs
from finegrain.runs import RunDir, atomic_write_bytes, atomic_write_json

SPLITS = ("train", "val", "test")


def save_embeddings(run: RunDir, split: str, out: Outputs, paths: list[str], encoder: EncodingLoop) -> None:
    """``embeddings/<split>.npz`` (vectors, labels, paths) + ``<split>.json`` naming the model and settings."""
    buf = io.BytesIO()
    np.savez(buf, embeddings=out.embeddings, labels=out.labels, paths=np.array(paths))
    # the old sidecar goes first: a kill between the two writes leaves vectors that are never reused
    (run.embeddings / f"{split}.json").unlink(missing_ok=True)
    atomic_write_bytes(run.embeddings / f"{split}.npz", buf.getvalue())
    atomic_write_json(
        run.embeddings / f"{split}.json",
        {
            "split": split,
            "n": int(len(out.labels)),
            "dim": int(out.embeddings.shape[1]),
            "model_checksum": encoder.loaded.checksum,
            **encoder.signature(),
            "images_per_second": out.images_per_second,
        },
    )


def load_embeddings(run: RunDir, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(vectors [N, D], labels [N], paths) of a split as saved."""
    path = run.embeddings / f"{split}.npz"
    if not path.is_file():
        raise FinegrainError(f"{run.path} has no {split} embeddings (run `finegrain embed {run.path} --split {split}`)")
    with np.load(path) as z:
        return z["embeddings"], z["labels"], [str(p) for p in z["paths"]]


def reusable_embeddings(
    run: RunDir, split: str, records: list[ImageRecord], encoder: EncodingLoop
) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """A split's saved embeddings if this encoder (same model, sizes, flips, precision, engine)
    made them from exactly these images; else None."""
    meta = run.embeddings / f"{split}.json"
    if split not in SPLITS or not meta.is_file():
        return None
    try:
        saved = json.loads(meta.read_text())
        wanted = {"model_checksum": encoder.loaded.checksum, **encoder.signature()}
        if any(saved.get(k) != v for k, v in wanted.items()):
            return None
        emb, labels, paths = load_embeddings(run, split)
    except (OSError, ValueError, KeyError, FinegrainError):
        return None  # damaged or old: embed again
    if sorted(paths) != sorted(str(r.path) for r in records):
        return None
    return emb, labels, paths
