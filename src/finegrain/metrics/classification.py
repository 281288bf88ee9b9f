"""Classification metrics (scikit-learn definitions).

:func:`classification_metrics` returns, as plain Python numbers:

* ``top1`` -- fraction of samples whose highest-scoring class is the true class
  (ties go to the lowest class index, as ``argmax``);
* ``top5`` -- fraction whose true class is among the ``min(5, C)`` highest-scoring classes
  (same tie rule: equal scores rank by class index, never in the true class's favour);
* ``loss`` -- mean cross-entropy: ``-log_softmax(logits)[label]`` for ``scores="logits"``,
  ``-log(clip(prob[label], 1e-12))`` for ``scores="probs"`` (probabilities used as given);
* ``precision_macro``, ``recall_macro``, ``f1_macro`` -- unweighted mean over all
  ``num_classes`` classes (``labels=range(num_classes)``, ``zero_division=0``), so a class
  absent from both labels and predictions counts as 0;
* ``precision_weighted``, ``recall_weighted``, ``f1_weighted`` -- mean weighted by
  support; weighted recall equals ``top1`` by definition;
* ``n`` -- number of samples (int).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from finegrain.errors import FinegrainError

SCORE_KINDS = ("logits", "probs")
PROB_EPS = 1e-12


def _labels(labels: Any, num_classes: int | None = None, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise FinegrainError(f"{name} must be a 1-D array [N]; got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.equal(np.mod(arr, 1), 0)):
            arr = arr.astype(np.int64)
        else:
            raise FinegrainError(f"{name} must be integer class indices; got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if num_classes is not None and arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise FinegrainError(f"{name} must lie in [0, {num_classes}); got range [{arr.min()}, {arr.max()}]")
    return arr


def top_k_accuracy(labels: np.ndarray, values: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest values (``k`` capped at C)."""
    labels = np.asarray(labels)
    values = np.asarray(values)
    n, c = values.shape
    k = max(1, min(int(k), c))
    if n == 0:
        return float("nan")
    if k == 1:
        return float(np.mean(values.argmax(1) == labels))
    if k == c:
        return 1.0
    # Rank of the true class in a stable descending order (ties go to the lower class
    # index, as argmax does): it is in the top k when fewer than k classes rank before it.
    # Ties are NOT resolved in the label's favour, so e.g. a true class with probability 0
    # among many zero-probability classes does not count as a top-5 hit.
    true_score = values[np.arange(n), labels][:, None]
    ahead = (values > true_score).sum(1)
    ahead += ((values == true_score) & (np.arange(c)[None, :] < labels[:, None])).sum(1)
    return float(np.mean(ahead < k))


def cross_entropy(labels: np.ndarray, values: np.ndarray, scores: str = "logits") -> float:
    """Mean cross-entropy of ``values`` (logits or probabilities) against ``labels``."""
    values = np.asarray(values, dtype=np.float64)
    n = len(labels)
    if n == 0:
        return float("nan")
    if scores == "logits":
        m = values.max(1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        log_z = np.log(np.exp(values - m).sum(1)) + m[:, 0]
        nll = log_z - values[np.arange(n), labels]
    elif scores == "probs":
        nll = -np.log(np.clip(values[np.arange(n), labels], PROB_EPS, None))
    else:
        raise FinegrainError(f"scores must be one of {SCORE_KINDS}; got {scores!r}")
    return float(np.mean(nll))


def classification_metrics(labels: Any, values: Any, num_classes: int, scores: str = "logits") -> dict:
    """Top-1/top-5 accuracy, mean cross-entropy and macro/weighted precision, recall, F1.

    ``labels``: ``[N]`` int class indices in ``[0, num_classes)``; ``values``: ``[N, C]``
    logits (``scores="logits"``) or class probabilities (``scores="probs"``) with
    ``C == num_classes``. See the module docstring for the exact definitions.
    """
    # optional: scikit-learn (the train extra), imported only when this runs
    from sklearn.metrics import precision_recall_fscore_support

    if scores not in SCORE_KINDS:
        raise FinegrainError(f"scores must be one of {SCORE_KINDS}; got {scores!r}")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise FinegrainError(f"num_classes must be >= 1; got {num_classes}")
    y = _labels(labels, num_classes)
    v = np.asarray(values)
    if v.ndim != 2 or v.shape[1] != num_classes:
        raise FinegrainError(f"values must have shape [N, {num_classes}]; got {v.shape}")
    if len(v) != len(y):
        raise FinegrainError(f"labels ({len(y)}) and values ({len(v)}) differ in length")
    if len(y) == 0:
        raise FinegrainError("no samples to evaluate")
    v = v.astype(np.float64, copy=False)
    preds = v.argmax(1)
    out: dict[str, Any] = {
        "top1": float(np.mean(preds == y)),
        "top5": top_k_accuracy(y, v, 5),
        "loss": cross_entropy(y, v, scores),
    }
    classes = list(range(num_classes))
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y, preds, labels=classes, average=avg, zero_division=0)
        out[f"precision_{avg}"] = float(p)
        out[f"recall_{avg}"] = float(r)
        out[f"f1_{avg}"] = float(f)
    out["n"] = int(len(y))
    return out


def per_class_table(labels: Any, preds: Any, class_names: Sequence[str]) -> list[dict]:
    """One row per class, in class-index order.

    Keys: ``class`` (name), ``support`` (true samples), ``correct``, ``accuracy``
    (correct / support; 0.0 when support is 0), ``precision``, ``recall``, ``f1``
    (scikit-learn, zero_division=0).
    """
    # optional: scikit-learn (the train extra), imported only when this runs
    from sklearn.metrics import precision_recall_fscore_support

    c = len(class_names)
    y = _labels(labels, c)
    p = _labels(preds, c, name="preds")
    if len(y) != len(p):
        raise FinegrainError(f"labels ({len(y)}) and preds ({len(p)}) differ in length")
    classes = list(range(c))
    if c == 0:
        return []
    prec, rec, f1, support = precision_recall_fscore_support(y, p, labels=classes, average=None, zero_division=0)
    correct = np.bincount(y[y == p], minlength=c)
    rows = []
    for i in classes:
        s = int(support[i])
        rows.append(
            {
                "class": str(class_names[i]),
                "support": s,
                "correct": int(correct[i]),
                "accuracy": float(correct[i] / s) if s else 0.0,
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
            }
        )
    return rows


def confusion_pairs(labels: Any, preds: Any, top: int = 10) -> list[tuple[int, int, int]]:
    """The ``top`` most frequent off-diagonal ``(true, predicted, count)`` pairs.

    Sorted by count (descending), then by true and predicted class index.
    """
    y = _labels(labels)
    p = _labels(preds, name="preds")
    if len(y) != len(p):
        raise FinegrainError(f"labels ({len(y)}) and preds ({len(p)}) differ in length")
    wrong = y != p
    if not wrong.any() or top <= 0:
        return []
    pairs, counts = np.unique(np.stack([y[wrong], p[wrong]], 1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:top]
    return [(int(pairs[i, 0]), int(pairs[i, 1]), int(counts[i])) for i in order]
