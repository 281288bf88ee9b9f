"""A gallery store's first content: the index ``finegrain index`` built, with its images.

Entries keep the index's ids (so ``/gallery/{id}`` URLs stay the same), its vectors and labels;
each image's bytes are copied into the store (content-addressed by sha256) and its file name kept
as the ``file`` metadata field. An image no longer on disk is imported without its picture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.faiss_import import import_faiss
from finegrain.gallery.store import StoreSpec, now_iso
from finegrain.retrieval.index import GalleryIndex
from finegrain.retrieval.searcher import label_name

log = logging.getLogger(__name__)


def index_vectors(index: Any) -> np.ndarray:
    """Every vector of a FAISS index [N, D], in id order (IVF indexes get their direct map first)."""
    faiss = import_faiss()
    try:
        faiss.extract_index_ivf(index).make_direct_map()
    except (RuntimeError, TypeError, AttributeError):
        pass  # not an IVF index
    return np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)


def index_spec(index_dir: Path, model_checksum: str, class_names: list[str] | None) -> StoreSpec | None:
    """The spec of a store made from the index in ``index_dir`` (None if there is no index there)."""
    meta_file = index_dir / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    return StoreSpec(
        dim=int(meta["dim"]), metric=str(meta["metric"]), model_checksum=model_checksum, class_names=class_names
    )


@dataclass(frozen=True)
class Imported:
    """One entry of an index, as a store takes it in (``image`` None: the file is gone)."""

    id: int
    label: str
    metadata: dict[str, Any]
    sha256: str
    media_type: str | None
    vector: np.ndarray
    image: bytes | None


def index_entries(index_dir: Path, spec: StoreSpec) -> Iterator[Imported]:
    """The entries of the index in ``index_dir`` (none if there is no index there), ids kept."""

    if not (index_dir / "meta.json").is_file():
        return
    index = GalleryIndex.load(index_dir, expected_model_checksum=spec.model_checksum)
    vectors = index_vectors(index.index)
    names = index.class_names or spec.class_names
    missing = 0
    for i, (path, label, vector) in enumerate(zip(index.paths, index.labels, vectors, strict=True)):
        name = label_name(names, int(label))
        data: bytes | None
        try:
            data = Path(path).read_bytes()
            sha = hashlib.sha256(data).hexdigest()
        except OSError:
            missing, data = missing + 1, None
            sha = "missing-" + hashlib.sha256(str(path).encode()).hexdigest()
        yield Imported(
            i,
            name,
            {"file": Path(path).name},
            sha,
            mimetypes.guess_type(str(path))[0],
            np.ascontiguousarray(vector, dtype=np.float32),
            data,
        )
    if missing:
        log.warning(
            "%d of the index's %d images are no longer on disk: imported without their picture",
            missing,
            len(index.paths),
        )
    log.info("imported the %d images of the index in %s into the gallery store", len(index.paths), index_dir)


def import_index(conn: sqlite3.Connection, index_dir: Path, spec: StoreSpec) -> None:
    """Copy the index in ``index_dir`` (if there is one) into a new embedded store's open transaction."""
    added_at = now_iso()
    for e in index_entries(index_dir, spec):
        if e.image is not None:
            conn.execute("INSERT OR IGNORE INTO images (sha256, data) VALUES (?, ?)", (e.sha256, e.image))
        conn.execute(
            "INSERT INTO entries (id, label, metadata, sha256, media_type, added_at, vector) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (e.id, e.label, json.dumps(e.metadata), e.sha256, e.media_type, added_at, e.vector.tobytes()),
        )
