"""The gallery index: FAISS vectors with their labels, paths and provenance.

```
index/
  index.faiss   the FAISS index (faiss.serialize_index bytes)
  labels.npy    int64 label of every vector, in index order
  paths.json    {"paths": [...], "class_names": [...] | null}
  meta.json     model checksum, dim, metric, kind, n, sha256 of index.faiss, ...
  maps.npy      optional: each image's embedding map, float16 [N, D, h, w] (explaining a hit)
```

Their encoding and the checks that refuse a damaged or inconsistent one are in
:mod:`finegrain.retrieval.index_files`.

Scores returned by :meth:`GalleryIndex.search`:

* ``metric="cosine"``: cosine similarity of L2-normalised vectors (inner product),
  in [-1, 1], **higher is more similar**; results are sorted by decreasing score.
* ``metric="euclidean"``: the Euclidean (L2) distance -- not squared -- so
  **lower is more similar**; results are sorted by increasing score.

Missing neighbours (possible only with approximate indexes on tiny galleries)
have id ``-1``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.errors import FinegrainError, unknown_name
from finegrain.faiss_import import import_faiss
from finegrain.machine import package_version
from finegrain.metrics.retrieval import l2_normalize
from finegrain.registry import Registry
from finegrain.retrieval.index_files import (
    INDEX_FILE,
    INDEX_FILES,
    LABELS_FILE,
    MAPS_FILE,
    META_FILE,
    PATHS_FILE,
    check_complete,
    check_consistent,
    check_model,
    encode_labels,
    encode_maps,
    encode_paths,
    maps_meta,
    read_faiss,
    read_labels,
    read_maps,
    read_meta,
    read_paths,
    recover_swap,
    sha256,
)
from finegrain.runs import (
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
)

log = logging.getLogger(__name__)

METRICS = ("cosine", "euclidean")


HNSW_M = 32
HNSW_EF_SEARCH = 128
HNSW_EF_CONSTRUCTION = 40  # faiss's default
IVF_MIN_POINTS_PER_LIST = 39  # faiss warns below 39 training points per centroid
IVF_MAX_TRAIN_POINTS_PER_LIST = 64  # k-means trains on a sample of at most 64 * nlist vectors
IVF_KMEANS_NITER = 10
RECALL_QUERIES = 1000
RECALL_K = 10


def _as_matrix(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise FinegrainError(f"{name} must be a 2-D array [N, D]; got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise FinegrainError(f"{name} must be numeric; got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def faiss_metric(metric: str) -> int:
    faiss = import_faiss()
    if metric == "cosine":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "euclidean":
        return faiss.METRIC_L2
    raise unknown_name("metric", metric, METRICS)


def ivf_params(n: int) -> tuple[int, int]:
    """(nlist, nprobe) for ``n`` vectors: nlist ~ 4 sqrt(n) capped by n / 39; nprobe ~ nlist / 8, at least 8."""
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n // IVF_MIN_POINTS_PER_LIST))
    nprobe = min(nlist, max(8, int(round(nlist / 8))))
    return nlist, nprobe


INDEX_KINDS: Registry[Callable[[int, str, int], tuple[Any, dict]]] = Registry("index kind")
"""Index kind → builder(dim, metric, n) of an empty FAISS index and its parameters (recorded in the metadata)."""

INDEX_OPENERS: Registry[Callable[[Path, Any, dict], Any]] = Registry("index opener")
"""Kinds that keep more than a FAISS index → opener(folder, FAISS index read, meta) of the index
:class:`GalleryIndex` holds; their index object writes its own files (``write_files(folder)``) and
serialises its FAISS part (``serialize()``)."""

INDEX_READ_FLAGS: Registry[Callable[[dict], int]] = Registry("index read flags")
"""Kinds whose FAISS part FAISS must read with I/O flags → flags(meta) (on-disk lists, say)."""

KIND_FILES: set[str] = set()
"""Files that kinds keep beside the four every index has (allowed in an index folder)."""


@INDEX_KINDS.register("flat")
def _flat(dim: int, metric: str, n: int) -> tuple[Any, dict]:
    faiss = import_faiss()
    return (faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)), {}


@INDEX_KINDS.register("hnsw")
def _hnsw(dim: int, metric: str, n: int) -> tuple[Any, dict]:
    index = import_faiss().IndexHNSWFlat(dim, HNSW_M, faiss_metric(metric))
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.hnsw.efSearch = HNSW_EF_SEARCH
    return index, {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}


@INDEX_KINDS.register("ivf")
def _ivf(dim: int, metric: str, n: int) -> tuple[Any, dict]:
    faiss = import_faiss()
    nlist, nprobe = ivf_params(n)
    quantizer = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss_metric(metric))
    index.cp.niter = IVF_KMEANS_NITER
    index.cp.max_points_per_centroid = IVF_MAX_TRAIN_POINTS_PER_LIST
    index.cp.min_points_per_centroid = 1  # tiny galleries: nlist is already capped by n / 39
    index.nprobe = nprobe
    return index, {
        "nlist": nlist,
        "nprobe": nprobe,
        "kmeans_niter": IVF_KMEANS_NITER,
        "train_points": min(n, nlist * IVF_MAX_TRAIN_POINTS_PER_LIST),
    }


def index_builder(kind: str, metric: str) -> Callable[[int, str, int], tuple[Any, dict]]:
    """The builder of an empty FAISS index of ``kind`` (and its parameters, recorded in the metadata);
    an unknown kind or metric is named, with the valid ones, before anything is built."""
    if metric not in METRICS:
        raise unknown_name("metric", metric, METRICS)
    return INDEX_KINDS.get(kind)


def _apply_search_params(index: Any, kind: str, params: dict) -> None:
    if kind == "hnsw" and "efSearch" in params:
        import_faiss().downcast_index(index).hnsw.efSearch = int(params["efSearch"])
    elif kind == "ivf" and "nprobe" in params:
        import_faiss().extract_index_ivf(index).nprobe = int(params["nprobe"])


def exact_neighbours(queries: np.ndarray, base: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact (brute-force) FAISS search without building an index: (faiss scores, ids).

    Vectors must already be prepared (normalised for cosine). For euclidean the
    scores are squared distances, as FAISS returns them.
    """
    return import_faiss().knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(base, dtype=np.float32),
        k,
        metric=faiss_metric(metric),
    )


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact k neighbours that the approximate search also returned."""
    k = exact_ids.shape[1]
    hits = sum(len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx_ids, exact_ids, strict=True))
    return float(hits) / float(k * len(exact_ids))


def check_k(k: object, gallery_size: int) -> int:
    """The one check of a neighbour count against a gallery: a whole number in [1, gallery size]."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= gallery_size:
        raise FinegrainError(f"k must be between 1 and the gallery size ({gallery_size}); got {k!r}")
    return int(k)


def index_meta(
    model_checksum: str,
    dim: int,
    metric: str,
    kind: str,
    n: int,
    params: dict,
    recall: float | None,
    build_seconds: float,
) -> dict:
    """meta.json of a new index (its files' sha256 and sizes are added by :meth:`GalleryIndex.save`)."""
    return {
        "model_checksum": model_checksum,
        "dim": int(dim),
        "metric": metric,
        "kind": kind,
        "n": int(n),
        "params": params,
        "score": "cosine similarity (higher is closer)"
        if metric == "cosine"
        else "euclidean distance (lower is closer)",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "approx_recall_at_10": recall,
        "build_seconds": round(build_seconds, 4),
        "finegrain_version": package_version("finegrain"),
        "faiss_version": getattr(import_faiss(), "__version__", "unknown"),
        "index_sha256": None,  # filled in by save()
    }


class GalleryIndex:
    """A FAISS index over gallery embeddings, with labels, paths and metadata.

    Build with :meth:`build`, persist with :meth:`save`, reopen with :meth:`load`.
    """

    def __init__(
        self,
        index: Any,
        labels: np.ndarray,
        paths: list[str],
        class_names: list[str] | None,
        meta: dict,
        maps: np.ndarray | None = None,
    ) -> None:
        self.index = index
        self.maps = maps
        """Each vector's embedding map ``[N, D, h, w]`` float16 (memory-mapped once loaded), or None:
        :mod:`finegrain.retrieval.explain_search` explains a hit from it without running the model."""
        self.labels = np.asarray(labels, dtype=np.int64)
        self.paths = list(paths)
        self.class_names = list(class_names) if class_names is not None else None
        self.meta = meta

    # -- properties -------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"GalleryIndex(n={self.n}, dim={self.dim}, metric={self.metric!r}, kind={self.kind!r})"

    # -- building ---------------------------------------------------------
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        labels: np.ndarray,
        paths: list[str],
        metric: str = "cosine",
        kind: str = "flat",
        *,
        model_checksum: str,
        class_names: list[str] | None = None,
        measure_recall: bool = True,
    ) -> GalleryIndex:
        """Index ``embeddings`` [N, D] with their ``labels`` [N] and image ``paths``.

        For approximate kinds (``hnsw``, ``ivf``) the recall@10 against exact
        search is measured on up to 1,000 gallery vectors used as queries and
        stored in ``meta["approx_recall_at_10"]`` (None for ``flat``).
        """
        make_index = index_builder(kind, metric)
        x = _as_matrix(embeddings, "embeddings")
        n, dim = x.shape
        if n == 0:
            raise FinegrainError("cannot build an index of an empty gallery")
        if not np.all(np.isfinite(x)):
            raise FinegrainError("embeddings contain NaN or infinite values")
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != n:
            raise FinegrainError(f"{len(labels)} labels for {n} embeddings")
        if len(paths) != n:
            raise FinegrainError(f"{len(paths)} paths for {n} embeddings")
        labels = labels.astype(np.int64)
        if metric == "cosine":
            x = l2_normalize(x)

        index, params = make_index(dim, metric, n)
        t0 = time.perf_counter()
        if not index.is_trained:
            index.train(x)
        index.add(x)
        finish = getattr(index, "finish", None)  # a kind that tunes itself once filled (ivfpq)
        if finish is not None:
            params = finish()
        build_seconds = time.perf_counter() - t0

        recall = None
        if kind != "flat" and measure_recall:
            recall = params.get("measured_recall")  # the builder's own, measured while tuning
            if recall is None:
                recall = cls._measure_recall(index, x, metric)
            # logged, not printed: `finegrain index` prints it from meta with the rest of its summary
            log.info("%s index (%s, n=%d): recall@%d vs exact search = %.4f", kind, metric, n, RECALL_K, recall)

        meta = index_meta(model_checksum, dim, metric, kind, n, params, recall, build_seconds)
        return cls(index, labels, list(map(str, paths)), class_names, meta)

    @staticmethod
    def _measure_recall(index: Any, x: np.ndarray, metric: str) -> float:
        n = len(x)
        k = min(RECALL_K, n)
        rng = np.random.default_rng(0)
        qi = np.sort(rng.choice(n, size=min(RECALL_QUERIES, n), replace=False))
        q = np.ascontiguousarray(x[qi])
        _, exact = exact_neighbours(q, x, k, metric)
        _, approx = index.search(q, k)
        return round(recall_at_k(approx, exact), 6)

    # -- searching --------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest gallery vectors of each query: (scores [Q, k], ids [Q, k]).

        Scores are cosine similarities (higher first) or Euclidean distances
        (lower first); see the module docstring.
        """
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise FinegrainError(f"queries have dimension {q.shape[1]} but the index holds {self.dim}-d vectors")
        k = check_k(k, self.n)
        if self.metric == "cosine":
            q = l2_normalize(q)
        scores, ids = self.index.search(q, int(k))
        if self.metric == "euclidean":
            scores = np.sqrt(np.maximum(scores, 0.0, out=scores), out=scores)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    # -- persistence ------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the four files into ``directory`` as one unit; returns the directory.

        They are written (each fsynced, meta.json last, with the sha256 of the others) into a
        sibling temporary folder, which then takes the place of the old index: a kill at any
        moment leaves the old index or the new one, whole, and at most a ``.<name>.*.tmp``
        folder that the next save removes. A folder that holds other files is refused.
        """

        d = Path(directory)
        d.parent.mkdir(parents=True, exist_ok=True)
        recover_swap(d)
        for stale in d.parent.glob(f".{d.name}.*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        if d.is_dir():
            others = sorted(
                p.name
                for p in d.iterdir()
                if p.name not in (*INDEX_FILES, MAPS_FILE) and p.name not in KIND_FILES and not p.name.endswith(".tmp")
            )
            if others:
                raise FinegrainError(
                    f"{d} holds other files than an index ({', '.join(others[:3])}); "
                    "choose an empty folder for the index"
                )
        data = self._serialize()
        labels = encode_labels(self.labels)
        paths = encode_paths(self.paths, self.class_names)
        self.meta["index_sha256"] = sha256(data)
        self.meta["index_bytes"] = len(data)
        self.meta["files_sha256"] = {LABELS_FILE: sha256(labels), PATHS_FILE: sha256(paths)}
        maps = None
        self.meta.pop("maps", None)
        if self.maps is not None:
            if self.maps.ndim != 4 or self.maps.shape[:2] != (self.n, self.dim):
                raise FinegrainError(
                    f"maps of shape {list(self.maps.shape)} for {self.n} vectors of {self.dim} dimensions"
                )
            maps = encode_maps(self.maps)
            self.meta["maps"] = maps_meta(self.maps, maps)
        tag = uuid.uuid4().hex[:8]
        new = d.with_name(f".{d.name}.{tag}.new.tmp")
        new.mkdir()
        try:
            atomic_write_bytes(new / INDEX_FILE, data)
            atomic_write_bytes(new / LABELS_FILE, labels)
            atomic_write_bytes(new / PATHS_FILE, paths)
            write_files = getattr(self.index, "write_files", None)  # a kind's own files (KIND_FILES)
            sizes = {INDEX_FILE: len(data), **(write_files(new) if write_files is not None else {})}
            self.meta["files_bytes"] = sizes
            self.meta["bytes_per_vector"] = round(sum(sizes.values()) / max(1, self.n), 2)
            if maps is not None:  # beside the vectors, not counted in their bytes (meta["maps"] has its own)
                atomic_write_bytes(new / MAPS_FILE, maps)
            atomic_write_json(new / META_FILE, self.meta)  # last: its presence marks a complete index
        except Exception:  # a full disk, say: the old index stays, nothing half-written beside it
            shutil.rmtree(new, ignore_errors=True)
            raise
        old = d.with_name(f".{d.name}.{tag}.old.tmp")
        if d.exists():
            os.rename(d, old)
        os.rename(new, d)  # a kill between the renames leaves the new one whole; recover_swap finds it
        fsync_dir(d.parent)
        shutil.rmtree(old, ignore_errors=True)
        return d

    def _serialize(self) -> bytes:
        own = getattr(self.index, "serialize", None)  # a kind holding more than a FAISS index
        return own() if own is not None else import_faiss().serialize_index(self.index).tobytes()

    @classmethod
    def load(cls, directory: str | Path, expected_model_checksum: str | None = None) -> GalleryIndex:
        """Reopen a saved index, refusing damaged files and indexes built by another model."""
        d = recover_swap(Path(directory))
        if not d.is_dir():
            raise FinegrainError(f"no index in {d} (build one with `finegrain index RUN`)")
        check_complete(d)
        meta = read_meta(d, METRICS, INDEX_KINDS)
        check_model(d, meta, expected_model_checksum)
        flags = INDEX_READ_FLAGS.get(meta["kind"])(meta) if meta["kind"] in INDEX_READ_FLAGS else 0
        index = read_faiss(d, meta, flags)
        if meta["kind"] in INDEX_OPENERS:
            index = INDEX_OPENERS.get(meta["kind"])(d, index, meta)
        _apply_search_params(index, meta["kind"], meta.get("params") or {})
        labels = read_labels(d)
        paths, class_names = read_paths(d)
        check_consistent(d, meta, index, labels, paths)
        return cls(index, labels, paths, class_names, meta, read_maps(d, meta))


from finegrain.retrieval import large_index as _large_index  # noqa: E402, F401 - registers "ivfpq" (it imports this module)
