"""finegrain.metrics.classification against scikit-learn on random data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax, softmax
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from finegrain.errors import FinegrainError
from finegrain.metrics.classification import (
    classification_metrics,
    confusion_pairs,
    per_class_table,
    top_k_accuracy,
)

KEYS = {
    "top1",
    "top5",
    "loss",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "n",
}


def _random(seed: int, n: int, c: int, present: int | None = None, signal: float = 1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, present or c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += signal  # better than chance, far from perfect
    return labels, logits


def _sklearn_reference(labels, probs, c):
    classes = list(range(c))
    preds = probs.argmax(1)
    ref = {
        "top1": accuracy_score(labels, preds),
        "top5": top_k_accuracy_score(labels, probs, k=min(5, c), labels=classes) if c > 5 else 1.0,
        "loss": log_loss(labels, probs, labels=classes),
    }
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=classes, average=avg, zero_division=0)
        ref.update({f"precision_{avg}": p, f"recall_{avg}": r, f"f1_{avg}": f})
    return ref


@pytest.mark.parametrize(
    "seed,n,c,present",
    [(0, 500, 20, None), (1, 300, 7, None), (2, 200, 50, 30), (3, 100, 3, None), (4, 1000, 196, None)],
)
def test_logits_match_sklearn(seed, n, c, present):
    labels, logits = _random(seed, n, c, present)
    m = classification_metrics(labels, logits, num_classes=c, scores="logits")
    assert set(m) == KEYS
    ref = _sklearn_reference(labels, softmax(logits, axis=1), c)
    for key, value in ref.items():
        assert m[key] == pytest.approx(value, abs=1e-9), key
        assert isinstance(m[key], float) and 0.0 <= m[key] <= (1.0 if key != "loss" else np.inf)
    assert m["n"] == n and isinstance(m["n"], int)
    # the loss is the mean of -log_softmax at the label
    assert m["loss"] == pytest.approx(-log_softmax(logits, axis=1)[np.arange(n), labels].mean(), rel=1e-12)
    # weighted recall equals top-1 accuracy by definition
    assert m["recall_weighted"] == pytest.approx(m["top1"], abs=1e-12)


def test_probs_match_sklearn():
    labels, logits = _random(5, 400, 12)
    probs = softmax(logits, axis=1)
    m = classification_metrics(labels, probs, 12, scores="probs")
    ref = _sklearn_reference(labels, probs, 12)
    for key, value in ref.items():
        assert m[key] == pytest.approx(value, abs=1e-9), key
    # same numbers as from the logits
    ml = classification_metrics(labels, logits, 12, scores="logits")
    for key in KEYS:
        assert m[key] == pytest.approx(ml[key], abs=1e-9), key


def test_probs_clip_zero_probability():
    labels = np.array([0, 1])
    probs = np.array([[1.0, 0.0], [1.0, 0.0]])  # second sample: its class has probability 0
    m = classification_metrics(labels, probs, 2, scores="probs")
    assert m["loss"] == pytest.approx(-np.log(1e-12) / 2)
    assert m["top1"] == 0.5 and m["top5"] == 1.0


def test_large_logits_are_stable():
    labels = np.array([0, 1, 2])
    logits = np.array([[1000.0, 0, 0], [0, -1000.0, 1000.0], [5.0, 5.0, 5.0]])
    m = classification_metrics(labels, logits, 3)
    assert np.isfinite(m["loss"])
    assert m["loss"] == pytest.approx((0.0 + 2000.0 + np.log(3)) / 3)


def test_top5_uses_min_5_c():
    labels, logits = _random(6, 200, 3)
    assert classification_metrics(labels, logits, 3)["top5"] == 1.0
    labels, logits = _random(7, 300, 6, signal=0.0)
    m = classification_metrics(labels, logits, 6)
    assert m["top5"] == pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=list(range(6))))


def test_top_k_ties_not_in_label_favour():
    # kNN-style probabilities: many classes tie at 0. A true class with probability 0 is
    # not a top-5 hit just because fewer than 5 classes have a positive score.
    probs = np.zeros((2, 10))
    probs[:, [3, 7]] = 0.5
    labels = np.array([9, 0])
    assert top_k_accuracy(labels, probs, 5) == 0.5  # class 0 is ranked 3rd (ties by index), class 9 last
    assert top_k_accuracy(labels, probs, 1) == 0.0
    assert top_k_accuracy(np.array([3]), probs[:1], 1) == 1.0  # tie 3 vs 7: lower index first (argmax)
    assert top_k_accuracy(np.array([7]), probs[:1], 1) == 0.0


def test_absent_classes_count_in_macro_average():
    labels = np.array([0, 0, 1, 1])
    logits = np.eye(4)[[0, 0, 1, 1]]
    m = classification_metrics(labels, logits, num_classes=4)
    assert m["top1"] == 1.0
    assert m["precision_macro"] == 0.5 and m["recall_macro"] == 0.5 and m["f1_macro"] == 0.5
    assert m["precision_weighted"] == 1.0 and m["f1_weighted"] == 1.0


def test_input_validation():
    with pytest.raises(FinegrainError):
        classification_metrics(np.array([0, 1]), np.zeros((2, 3)), num_classes=4)
    with pytest.raises(FinegrainError):
        classification_metrics(np.array([0, 5]), np.zeros((2, 3)), num_classes=3)
    with pytest.raises(FinegrainError):
        classification_metrics(np.array([0, 1, 2]), np.zeros((2, 3)), num_classes=3)
    with pytest.raises(FinegrainError):
        classification_metrics(np.array([0, 1]), np.zeros((2, 3)), num_classes=3, scores="softmax")
    with pytest.raises(FinegrainError):
        classification_metrics(np.array([], dtype=int), np.zeros((0, 3)), num_classes=3)


def test_per_class_table_matches_sklearn():
    labels, logits = _random(8, 400, 9, present=8)  # class 8 never occurs
    preds = logits.argmax(1)
    names = [f"c{i}" for i in range(9)]
    rows = per_class_table(labels, preds, names)
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=list(range(9)), average=None, zero_division=0)
    assert [row["class"] for row in rows] == names
    for i, row in enumerate(rows):
        assert set(row) == {"class", "support", "correct", "accuracy", "precision", "recall", "f1"}
        assert row["support"] == s[i] == int((labels == i).sum())
        assert row["correct"] == int(((labels == i) & (preds == i)).sum())
        assert row["precision"] == pytest.approx(p[i]) and row["recall"] == pytest.approx(r[i])
        assert row["f1"] == pytest.approx(f[i])
        assert row["accuracy"] == pytest.approx(row["correct"] / row["support"] if row["support"] else 0.0)
    assert rows[8]["support"] == 0 and rows[8]["accuracy"] == 0.0
    assert sum(row["correct"] for row in rows) == int((labels == preds).sum())


def test_confusion_pairs_match_confusion_matrix():
    labels, logits = _random(9, 600, 6, signal=0.5)
    preds = logits.argmax(1)
    cm = confusion_matrix(labels, preds, labels=list(range(6)))
    pairs = confusion_pairs(labels, preds, top=10)
    assert len(pairs) == 10
    counts = [c for _, _, c in pairs]
    assert counts == sorted(counts, reverse=True)
    for t, p, c in pairs:
        assert t != p and cm[t, p] == c
        assert all(isinstance(v, int) for v in (t, p, c))
    off = cm.copy()
    np.fill_diagonal(off, 0)
    assert counts == sorted(off.ravel().tolist(), reverse=True)[:10]
    all_pairs = confusion_pairs(labels, preds, top=100)
    assert len(all_pairs) == int((off > 0).sum())


def test_confusion_pairs_edge_cases():
    assert confusion_pairs(np.array([0, 1, 2]), np.array([0, 1, 2])) == []
    assert confusion_pairs(np.array([0, 0, 1, 1, 1]), np.array([1, 1, 0, 0, 2]), top=2) == [(0, 1, 2), (1, 0, 2)]
    assert confusion_pairs(np.array([0, 1]), np.array([1, 0]), top=0) == []
