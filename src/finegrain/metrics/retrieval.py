"""Retrieval metrics: Recall@K, Precision@1, R-Precision, MAP@R and NMI.

Two protocols:

* **leave-one-out** (no ``query_embeddings``): every item is a query and the gallery is
  all the *other* items. The query itself is excluded **by index**, not by distance, so an
  exact duplicate of a query (another item with the same vector) stays in its gallery and
  counts like any other neighbour.
* **queries against a gallery** (``query_embeddings`` and ``query_labels`` given): the
  gallery is ``embeddings`` as a whole; nothing is excluded.

Definitions (``R`` = number of gallery items with the query's label, the query itself not
counted; neighbours ranked by decreasing cosine similarity or increasing L2 distance):

* ``recall@k`` -- retrieval papers' Recall@K: 1 if at least one of the ``k`` nearest
  neighbours has the query's label, else 0, averaged over **all** queries (a query whose
  class has no other gallery item always scores 0). When ``k`` exceeds the gallery size the
  whole gallery is used.
* ``precision@1`` -- fraction of queries whose nearest neighbour has their label.
* ``r_precision`` -- mean over queries of (same-label items among the ``R`` nearest) / ``R``.
* ``map@r`` -- mean over queries of ``(1/R) * sum_{i<=R} P(i) * rel(i)``, where ``rel(i)``
  is 1 when the i-th neighbour has the query's label and ``P(i)`` is the precision of the
  first ``i`` neighbours (Musgrave et al., "A Metric Learning Reality Check", 2020).
* ``nmi`` -- normalised mutual information (scikit-learn) between the labels and a seeded
  k-means clustering of the query embeddings (all embeddings in leave-one-out mode; L2-
  normalised first for ``metric="cosine"``) with as many clusters as there are distinct
  query labels. The clustering is scikit-learn's ``KMeans`` (k-means++ initialisation, one
  run, ``random_state=seed``); pytorch-metric-learning's default faiss k-means starts from
  random points and can merge clusters, so its NMI may come out lower on the same data.

**Queries with no same-label item in the gallery (R = 0) are excluded from
``precision@1``, ``r_precision`` and ``map@r``** -- as pytorch-metric-learning's
``AccuracyCalculator`` does -- and counted in ``n_lone_queries``; they are *not* excluded
from ``recall@k``. If every query is lone, those three are NaN.

The neighbour search is exact (FAISS ``IndexFlatIP`` on L2-normalised vectors for cosine,
``IndexFlatL2`` for Euclidean) and runs over query chunks sized so the per-chunk
neighbour lists stay within ``memory_mb``; ``max(max(ks), max R)`` neighbours are
retrieved per query.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from finegrain.errors import FinegrainError
from finegrain.faiss_import import import_faiss

METRICS = ("cosine", "euclidean")
DEFAULT_KS = (1, 2, 4, 8)
# Peak bytes per (query, neighbour) entry while a chunk is processed: faiss distances (4)
# and ids (8, plus a copy without self), gathered labels (8), boolean masks (~4),
# cumulative counts (8), precisions and their product with the relevance mask (16).
_BYTES_PER_ENTRY = 64
DEFAULT_MEMORY_MB = 128.0


def _as_matrix(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise FinegrainError(f"{name} must be a 2-D array [N, D]; got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise FinegrainError(f"{name} must be numeric; got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise FinegrainError(f"{name} contains NaN or infinite values")
    return arr


def _as_labels(x: Any, n: int, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1 or len(arr) != n:
        raise FinegrainError(f"{name} must be a 1-D array of length {n}; got shape {arr.shape}")
    return arr


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a float32 copy); all-zero rows stay zero. The one normaliser of the
    package: metrics, indexes and maps all use it."""
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise FinegrainError(f"metric must be one of {METRICS}; got {metric!r}")


def _check_ks(ks: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(ks, (int, np.integer)):
        ks = (int(ks),)
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise FinegrainError(f"ks must be positive integers; got {ks}")
    return ks


class _Problem:
    """Validated inputs: encoded labels, prepared vectors, R per query."""

    def __init__(self, embeddings, labels, metric, query_embeddings, query_labels):
        _check_metric(metric)
        self.metric = metric
        gallery = _as_matrix(embeddings, "embeddings")
        g_labels = _as_labels(labels, len(gallery), "labels")
        self.loo = query_embeddings is None
        if self.loo:
            if query_labels is not None:
                raise FinegrainError("query_labels given without query_embeddings")
            queries, q_labels = gallery, g_labels
        else:
            if query_labels is None:
                raise FinegrainError("query_embeddings given without query_labels")
            queries = _as_matrix(query_embeddings, "query_embeddings")
            q_labels = _as_labels(query_labels, len(queries), "query_labels")
            if queries.shape[1] != gallery.shape[1]:
                raise FinegrainError(f"query dimension {queries.shape[1]} != gallery dimension {gallery.shape[1]}")
        if len(queries) == 0:
            raise FinegrainError("no queries to evaluate")
        self.n_gallery = len(gallery) - (1 if self.loo else 0)  # gallery size seen by each query
        if self.n_gallery < 1:
            raise FinegrainError("the gallery is empty (leave-one-out needs at least 2 items)")
        # encode labels of both sets into one integer code space
        all_labels = np.concatenate([g_labels, q_labels]) if not self.loo else g_labels
        _, codes = np.unique(all_labels, return_inverse=True)
        codes = codes.reshape(-1).astype(np.int64)
        self.g_codes = codes[: len(gallery)]
        self.q_codes = self.g_codes if self.loo else codes[len(gallery) :]
        counts = np.bincount(self.g_codes, minlength=int(codes.max()) + 1)
        self.r = counts[self.q_codes] - (1 if self.loo else 0)
        if metric == "cosine":
            gallery = l2_normalize(gallery)
            queries = gallery if self.loo else l2_normalize(queries)
        self.gallery, self.queries = gallery, queries

    def neighbour_labels(self, k: int, memory_mb: float = DEFAULT_MEMORY_MB) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, end, labels [end-start, k])`` of the ``k`` nearest gallery items
        of the queries ``start:end`` (self excluded by index in leave-one-out mode)."""

        faiss = import_faiss()

        k = int(min(k, self.n_gallery))
        k_search = k + 1 if self.loo else k
        index = (
            faiss.IndexFlatIP(self.gallery.shape[1])
            if self.metric == "cosine"
            else faiss.IndexFlatL2(self.gallery.shape[1])
        )
        index.add(self.gallery)
        n_q = len(self.queries)
        chunk = int(max(1, min(n_q, 8192, memory_mb * 2**20 // (_BYTES_PER_ENTRY * k_search))))
        for start in range(0, n_q, chunk):
            end = min(n_q, start + chunk)
            _, ids = index.search(self.queries[start:end], k_search)
            if self.loo:
                is_self = ids == np.arange(start, end)[:, None]
                # rows where self is not among the k+1 (only possible with >k exact
                # duplicates of the query): drop the last neighbour instead
                is_self[~is_self.any(1), -1] = True
                ids = ids[~is_self].reshape(end - start, k)
            if (ids < 0).any():  # cannot happen with a flat index and k <= gallery size
                raise FinegrainError("the neighbour search returned missing neighbours")
            yield start, end, self.g_codes[ids]


def recall_at_k(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] | int = DEFAULT_KS,
    metric: str = "cosine",
    query_embeddings: Any = None,
    query_labels: Any = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> dict[int, float]:
    """Recall@K only, as ``{k: value}``; same protocol and definition as :func:`retrieval_metrics`."""
    ks = _check_ks(ks)
    p = _Problem(embeddings, labels, metric, query_embeddings, query_labels)
    hits = dict.fromkeys(ks, 0)
    for start, end, nbr in p.neighbour_labels(max(ks), memory_mb):
        match = nbr == p.q_codes[start:end, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(1).sum())
    return {k: hits[k] / len(p.queries) for k in ks}


def _nmi(x: np.ndarray, codes: np.ndarray, seed: int) -> float:
    # optional: scikit-learn (the train extra), imported only when this runs
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    n_clusters = len(np.unique(codes))
    if n_clusters < 2:
        clusters = np.zeros(len(codes), dtype=np.int64)
    else:
        km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed, max_iter=100)
        clusters = km.fit_predict(x.astype(np.float64 if len(x) * x.shape[1] < 10**6 else np.float32))
    return float(normalized_mutual_info_score(codes, clusters))


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] | int = DEFAULT_KS,
    metric: str = "cosine",
    query_embeddings: Any = None,
    query_labels: Any = None,
    *,
    nmi: bool = True,
    seed: int = 0,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> dict:
    """Recall@K, Precision@1, R-Precision, MAP@R and NMI of an embedding.

    ``embeddings``: ``[N, D]`` gallery vectors (and queries, in leave-one-out mode);
    ``labels``: ``[N]`` their labels (any values ``np.unique`` can sort). Give
    ``query_embeddings`` ``[M, D]`` and ``query_labels`` ``[M]`` to search queries against the
    gallery instead of leave-one-out. ``metric``: ``"cosine"`` or ``"euclidean"``.
    ``nmi=False`` skips the k-means clustering (``nmi`` is then absent); ``seed`` seeds it.

    Returns ``recall@{k}`` for each k, ``precision@1``, ``r_precision``, ``map@r``, ``nmi``
    (floats in [0, 1]; see the module docstring for the definitions), ``n_queries``,
    ``n_gallery`` (gallery size seen by one query) and ``n_lone_queries`` (queries with no
    same-label gallery item: excluded from precision@1, r_precision and map@r, counted as
    misses in recall@k).
    """
    ks = _check_ks(ks)
    p = _Problem(embeddings, labels, metric, query_embeddings, query_labels)
    n_q = len(p.queries)
    valid = p.r > 0
    k_needed = max(max(ks), int(p.r.max()))
    hits = dict.fromkeys(ks, 0)
    p1 = rp = mapr = 0.0
    for start, end, nbr in p.neighbour_labels(k_needed, memory_mb):
        match = nbr == p.q_codes[start:end, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(1).sum())
        v = valid[start:end]
        if not v.any():
            continue
        match, r = match[v], p.r[start:end][v]
        n_cols = match.shape[1]
        within_r = np.arange(n_cols)[None, :] < r[:, None]
        rel = match & within_r
        p1 += float(match[:, 0].sum())
        rp += float((rel.sum(1) / r).sum())
        cum = np.cumsum(rel, axis=1, dtype=np.int64)
        prec = cum / np.arange(1, n_cols + 1, dtype=np.float64)[None, :]
        mapr += float(((prec * rel).sum(1) / r).sum())
        del cum, prec, rel, within_r
    n_valid = int(valid.sum())
    out: dict[str, Any] = {f"recall@{k}": hits[k] / n_q for k in ks}
    nan = float("nan")
    out["precision@1"] = p1 / n_valid if n_valid else nan
    out["r_precision"] = rp / n_valid if n_valid else nan
    out["map@r"] = mapr / n_valid if n_valid else nan
    if nmi:
        out["nmi"] = _nmi(p.queries, p.q_codes, seed)
    out["n_queries"] = int(n_q)
    out["n_gallery"] = int(p.n_gallery)
    out["n_lone_queries"] = int(n_q - n_valid)
    return out
