"""kNN classification agrees with scikit-learn's brute-force KNeighborsClassifier."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from finegrain.errors import FinegrainError
from finegrain.retrieval.knn import knn_classify


def random_data(n=600, q=300, d=24, c=7, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d))
    yg = rng.integers(0, c, size=n)
    g = (centers[yg] * 0.7 + rng.normal(size=(n, d))).astype(np.float32)
    yq = rng.integers(0, c, size=q)
    x = (centers[yq] * 0.7 + rng.normal(size=(q, d))).astype(np.float32)
    return g, yg, x


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("k", [1, 4, 10])
def test_matches_sklearn(metric, weights, k):
    g, yg, x = random_data(seed=k)
    preds, scores, seconds = knn_classify(g, yg, x, k=k, metric=metric, weights=weights)
    sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric=metric, weights=weights).fit(g, yg)
    np.testing.assert_array_equal(preds, sk.predict(x))
    np.testing.assert_allclose(scores, sk.predict_proba(x), atol=1e-5)
    assert seconds >= 0


def test_uniform_ties_go_to_lowest_class_like_sklearn():
    # k=4 with 2 votes for class 3 and 2 for class 1: both pick class 1
    g = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]], dtype=np.float32)
    y = np.array([3, 1, 3, 1, 0])
    x = np.array([[0.4]], dtype=np.float32)
    preds, scores, _ = knn_classify(g, y, x, k=4)
    sk = KNeighborsClassifier(n_neighbors=4, algorithm="brute").fit(g, y)
    assert preds[0] == sk.predict(x)[0] == 1
    np.testing.assert_allclose(scores[0], [0, 0.5, 0, 0.5])


def test_vote_fractions_sum_to_one():
    g, yg, x = random_data()
    for weights in ("uniform", "distance"):
        preds, scores, _ = knn_classify(g, yg, x, k=10, weights=weights, num_classes=12)
        assert scores.shape == (len(x), 12) and scores.dtype == np.float32
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-6)
        assert np.all(scores[:, 7:] == 0)
        np.testing.assert_array_equal(preds, scores.argmax(axis=1))


def test_zero_distance_neighbour_takes_the_vote():
    g = np.array([[0.0, 0.0], [1.0, 0.0], [1.1, 0.0]], dtype=np.float32)
    y = np.array([0, 1, 1])
    preds, scores, _ = knn_classify(g, y, g[:1], k=3, weights="distance")
    assert preds[0] == 0 and scores[0, 0] == 1.0


@pytest.mark.parametrize("k", [0, -1, 601, 2.5, True])
def test_bad_k_refused(k):
    g, yg, x = random_data()
    with pytest.raises(FinegrainError, match="k must be"):
        knn_classify(g, yg, x, k=k)


def test_other_validation():
    g, yg, x = random_data()
    with pytest.raises(FinegrainError, match="metric"):
        knn_classify(g, yg, x, metric="manhattan")
    with pytest.raises(FinegrainError, match="weights"):
        knn_classify(g, yg, x, weights="rank")
    with pytest.raises(FinegrainError, match="-d"):
        knn_classify(g, yg, x[:, :5])
    with pytest.raises(FinegrainError, match="labels"):
        knn_classify(g, yg[:10], x)
    with pytest.raises(FinegrainError, match="out of range"):
        knn_classify(g, yg, x, num_classes=3)
