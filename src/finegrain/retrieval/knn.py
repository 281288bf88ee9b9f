"""k-nearest-neighbour classification over embeddings, with exact FAISS search.

Behaves like scikit-learn's ``KNeighborsClassifier(algorithm="brute")``:

* ``weights="uniform"``: each of the k neighbours casts one vote.
* ``weights="distance"``: votes weighted by inverse distance, ``1 / d``. For
  ``metric="euclidean"`` d is the Euclidean distance; for ``metric="cosine"`` it
  is the cosine distance ``1 - cosine similarity`` (scikit-learn's definition),
  so closer (more similar) neighbours weigh more. As in scikit-learn, when some
  neighbours are at distance 0 only they vote.
* Ties between classes go to the lowest class index (``argmax`` takes the first
  maximum), which is what scikit-learn does.

The returned scores are the vote fractions per class (rows sum to 1), usable as
class probabilities.
"""

from __future__ import annotations

import time

import numpy as np

from finegrain.errors import FinegrainError
from finegrain.metrics.retrieval import l2_normalize
from finegrain.retrieval.index import check_k, exact_neighbours

METRICS = ("euclidean", "cosine")
WEIGHTS = ("uniform", "distance")


def _matrix(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise FinegrainError(f"{name} must be a 2-D array [N, D]; got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def knn_classify(
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
    query_emb: np.ndarray,
    k: int = 10,
    metric: str = "euclidean",
    weights: str = "uniform",
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Classify each query by its ``k`` nearest gallery vectors.

    Returns ``(preds [Q] int64, scores [Q, C] float32 vote fractions, seconds)``
    where ``seconds`` is the wall time of the search and the vote.
    """
    if metric not in METRICS:
        raise FinegrainError(f"unknown kNN metric '{metric}'. Valid: {', '.join(METRICS)}")
    if weights not in WEIGHTS:
        raise FinegrainError(f"unknown kNN weights '{weights}'. Valid: {', '.join(WEIGHTS)}")
    g = _matrix(gallery_emb, "gallery embeddings")
    q = _matrix(query_emb, "query embeddings")
    n = len(g)
    if n == 0:
        raise FinegrainError("the kNN gallery is empty")
    if q.shape[1] != g.shape[1]:
        raise FinegrainError(f"query embeddings are {q.shape[1]}-d but the gallery is {g.shape[1]}-d")
    labels = np.asarray(gallery_labels).reshape(-1)
    if len(labels) != n:
        raise FinegrainError(f"{len(labels)} gallery labels for {n} gallery embeddings")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise FinegrainError("gallery labels must be integer class indices")
    labels = labels.astype(np.int64)
    k = check_k(k, n)
    if labels.min() < 0:
        raise FinegrainError("gallery labels must be non-negative class indices")
    c = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.max() >= c:
        raise FinegrainError(f"gallery label {int(labels.max())} is out of range for {c} classes")
    nq = len(q)
    if nq == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, c), dtype=np.float32), 0.0

    t0 = time.perf_counter()
    if metric == "cosine":
        sims, ids = exact_neighbours(l2_normalize(q), l2_normalize(g), k, "cosine")
        dist = np.maximum(1.0 - sims.astype(np.float64), 0.0)
    else:
        sq, ids = exact_neighbours(q, g, k, "euclidean")
        dist = np.sqrt(np.maximum(sq.astype(np.float64), 0.0))
    neigh = labels[ids]  # [Q, k]

    if weights == "uniform":
        w = np.ones_like(dist)
    else:
        with np.errstate(divide="ignore"):
            w = 1.0 / dist
        zero = np.isinf(w)
        rows = zero.any(axis=1)
        w[rows] = zero[rows]  # neighbours at distance 0 take all the vote
    flat = (np.arange(nq, dtype=np.int64)[:, None] * c + neigh).ravel()
    votes = np.bincount(flat, weights=w.ravel(), minlength=nq * c).reshape(nq, c)
    preds = votes.argmax(axis=1).astype(np.int64)  # first maximum: lowest class index wins ties
    scores = (votes / votes.sum(axis=1, keepdims=True)).astype(np.float32)
    seconds = time.perf_counter() - t0
    return preds, scores, seconds
