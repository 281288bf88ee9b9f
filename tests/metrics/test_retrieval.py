"""finegrain.metrics.retrieval against pytorch-metric-learning and a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from finegrain.errors import FinegrainError
from finegrain.metrics.retrieval import recall_at_k, retrieval_metrics

PML_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
OURS = {"precision_at_1": "precision@1", "r_precision": "r_precision", "mean_average_precision_at_r": "map@r"}


def clustered(seed: int, n_classes: int, per_class, dim: int = 16, spread: float = 1.0):
    """Gaussian clusters around random centres; ``per_class`` an int or a list of counts."""
    rng = np.random.default_rng(seed)
    counts = [per_class] * n_classes if isinstance(per_class, int) else list(per_class)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), counts)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm]


def normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force_recall(gallery, g_labels, ks, metric, queries=None, q_labels=None):
    """Full distance matrix, self excluded by index (leave-one-out) when no queries."""
    loo = queries is None
    if loo:
        queries, q_labels = gallery, g_labels
    g, q = gallery.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        d = -(normalize(q) @ normalize(g).T)
    else:
        d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    if loo:
        np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")
    if loo:
        order = order[:, :-1]
    match = g_labels[order] == q_labels[:, None]
    return {k: float(match[:, :k].any(1).mean()) for k in ks}


def pml(query, query_labels, reference=None, reference_labels=None, include=PML_METRICS):
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    torch.manual_seed(0)
    calc = AccuracyCalculator(include=include, k="max_bin_count")
    if reference is None:
        return calc.get_accuracy(query, query_labels, query, query_labels, ref_includes_query=True)
    return calc.get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query=False)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize(
    "seed,n_classes,per_class,spread",
    [
        (0, 10, 30, 1.0),
        (1, 8, [5, 60, 12, 33, 2, 40, 9, 25], 0.8),  # unbalanced, one class of 2
        (2, 25, 12, 1.3),
    ],
)
def test_leave_one_out_matches_pytorch_metric_learning(metric, seed, n_classes, per_class, spread):
    x, y = clustered(seed, n_classes, per_class, spread=spread)
    m = retrieval_metrics(x, y, ks=(1, 2, 4, 8), metric=metric, nmi=False)
    # pytorch-metric-learning searches with L2; on unit vectors that ranks like cosine
    ref = pml(normalize(x) if metric == "cosine" else x, y)
    for key in PML_METRICS:
        assert m[OURS[key]] == pytest.approx(ref[key], abs=1e-6), key
        assert 0.05 < m[OURS[key]] < 0.999  # the data are in the informative range
    assert m["n_queries"] == len(y) and m["n_gallery"] == len(y) - 1 and m["n_lone_queries"] == 0


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_queries_against_gallery_match_pytorch_metric_learning(metric):
    xg, yg = clustered(3, 12, 25, spread=1.1)
    rng = np.random.default_rng(4)
    # queries from the same classes, plus a few of a class absent from the gallery
    xq, yq = clustered(3, 12, 10, spread=1.1)
    xq = xq + 0.05 * rng.normal(size=xq.shape).astype(np.float32)
    xq = np.concatenate([xq, rng.normal(size=(5, xq.shape[1])).astype(np.float32)])
    yq = np.concatenate([yq, np.full(5, 99)])
    m = retrieval_metrics(xg, yg, metric=metric, query_embeddings=xq, query_labels=yq, nmi=False)
    prep = normalize if metric == "cosine" else (lambda a: a)
    ref = pml(prep(xq), yq, prep(xg), yg)
    for key in PML_METRICS:
        assert m[OURS[key]] == pytest.approx(ref[key], abs=1e-6), key
    assert m["n_queries"] == len(yq) and m["n_gallery"] == len(yg) and m["n_lone_queries"] == 5
    # lone queries count as misses in recall@k but are excluded from precision@1
    assert m["recall@1"] == pytest.approx(m["precision@1"] * (len(yq) - 5) / len(yq))


class SklearnKMeans:
    """A kmeans_func for AccuracyCalculator doing what finegrain does (seeded k-means++)."""

    def __call__(self, x, n_clusters):
        import torch
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=n_clusters, n_init=1, random_state=0, max_iter=100)
        return torch.as_tensor(km.fit_predict(x.cpu().numpy().astype(np.float64)))


def pml_nmi(x, y, kmeans_func=None):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("NMI",), kmeans_func=kmeans_func)
    return calc.get_accuracy(x, y, x, y, ref_includes_query=True)["NMI"]


def test_nmi_matches_pytorch_metric_learning():
    # separated clusters: seeded k-means++ finds them (NMI 1); PML's default faiss k-means
    # (random initial centroids) often merges two clusters, so it can only be lower
    x, y = clustered(5, 10, 40, spread=0.25)
    m = retrieval_metrics(x, y, metric="euclidean")
    assert m["nmi"] == pytest.approx(1.0)
    assert m["nmi"] == pytest.approx(pml_nmi(x, y, SklearnKMeans()))
    assert m["nmi"] >= pml_nmi(x, y) - 1e-9
    # overlapping clusters: the same clustering gives the same NMI (the definition:
    # one cluster per distinct label, scikit-learn's normalized_mutual_info_score)
    x, y = clustered(6, 10, 40, spread=1.5)
    m = retrieval_metrics(x, y, metric="euclidean", seed=0)
    assert 0.1 < m["nmi"] < 0.95
    assert m["nmi"] == pytest.approx(pml_nmi(x, y, SklearnKMeans()), abs=1e-9)
    # cosine clusters the unit vectors
    m = retrieval_metrics(x, y, metric="cosine", seed=0)
    assert m["nmi"] == pytest.approx(pml_nmi(normalize(x), y, SklearnKMeans()), abs=1e-9)
    # seeded: the same value twice
    assert retrieval_metrics(x, y, seed=3)["nmi"] == retrieval_metrics(x, y, seed=3)["nmi"]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_recall_at_k_matches_brute_force(metric):
    x, y = clustered(7, 15, [np.random.default_rng(7).integers(1, 40) for _ in range(15)], spread=1.2)
    ks = (1, 2, 4, 8, 16, 32)
    ref = brute_force_recall(x, y, ks, metric)
    m = retrieval_metrics(x, y, ks=ks, metric=metric, nmi=False)
    for k in ks:
        assert m[f"recall@{k}"] == pytest.approx(ref[k], abs=1e-12), k
    assert recall_at_k(x, y, ks, metric) == pytest.approx(ref)
    assert len({round(v, 6) for v in ref.values()}) > 3  # not trivially saturated
    # queries against a gallery
    xq, yq = clustered(8, 15, 6, spread=1.2)
    ref = brute_force_recall(x, y, ks, metric, xq, yq)
    m = retrieval_metrics(x, y, ks=ks, metric=metric, query_embeddings=xq, query_labels=yq, nmi=False)
    for k in ks:
        assert m[f"recall@{k}"] == pytest.approx(ref[k], abs=1e-12), k


def test_random_embeddings_score_chance():
    rng = np.random.default_rng(9)
    n = 2000
    x = rng.normal(size=(n, 32)).astype(np.float32)
    y = np.repeat(np.arange(10), n // 10)
    for metric in ("cosine", "euclidean"):
        m = retrieval_metrics(x, y, ks=(1, 8), metric=metric)
        chance = (n // 10 - 1) / (n - 1)
        assert abs(m["recall@1"] - chance) < 0.03
        assert abs(m["precision@1"] - chance) < 0.03
        assert abs(m["r_precision"] - chance) < 0.02
        assert m["map@r"] < 0.05
        assert m["nmi"] < 0.05
        # any of 8 neighbours: 1 - (1 - p)^8 roughly
        assert abs(m["recall@8"] - (1 - (1 - chance) ** 8)) < 0.04


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_perfectly_separated_clusters_score_one(metric):
    x, y = clustered(10, 8, [3, 10, 7, 20, 5, 9, 2, 14], dim=32, spread=1e-3)
    x = x + 10 * np.eye(32, dtype=np.float32)[y]  # cosine-separated too
    m = retrieval_metrics(x, y, ks=(1, 2, 4, 8, 100), metric=metric)
    for key, value in m.items():
        if not key.startswith("n_"):
            assert value == pytest.approx(1.0), key
    xq = x[:20] + 1e-4
    m = retrieval_metrics(x, y, metric=metric, query_embeddings=xq, query_labels=y[:20])
    for key, value in m.items():
        if not key.startswith("n_"):
            assert value == pytest.approx(1.0), key


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_duplicate_of_query_counts_self_excluded_by_index(metric):
    rng = np.random.default_rng(11)
    others = rng.normal(size=(30, 8)).astype(np.float32)
    q = rng.normal(size=(1, 8)).astype(np.float32)
    # item 0 and item 1 are the same vector with the same label; nothing else has it
    x = np.concatenate([q, q, others])
    y = np.concatenate([[7, 7], rng.integers(0, 3, 30)])
    m = retrieval_metrics(x, y, ks=(1,), metric=metric, nmi=False)
    ref = brute_force_recall(x, y, (1,), metric)
    assert m["recall@1"] == pytest.approx(ref[1])
    # the two duplicates find each other: both are hits at rank 1 with a perfect MAP@R
    m_dup = retrieval_metrics(x[:2], y[:2], ks=(1,), metric=metric, nmi=False)
    assert m_dup["recall@1"] == 1.0 and m_dup["map@r"] == 1.0
    hits_without_dups = ref[1] * len(y) - 2
    assert hits_without_dups >= 0 and float(hits_without_dups).is_integer()
    # if the duplicate had another label, the query would miss (distance 0 is not "self")
    y2 = y.copy()
    y2[1] = 8
    m2 = retrieval_metrics(x, y2, ks=(1,), metric=metric, nmi=False)
    assert m2["n_lone_queries"] == 2 and m2["recall@1"] == pytest.approx(m["recall@1"] - 2 / len(y))


def test_many_duplicates_and_singletons():
    # 6 identical vectors of one class: self must be excluded even when it is not
    # the first of the tied neighbours
    x = np.concatenate([np.ones((6, 4)), np.arange(16).reshape(4, 4) - 8.0]).astype(np.float32)
    y = np.array([1] * 6 + [2, 3, 4, 5])
    for metric in ("cosine", "euclidean"):
        m = retrieval_metrics(x, y, ks=(1, 2, 5), metric=metric, nmi=False)
        assert m["n_lone_queries"] == 4  # classes 2..5 have a single item
        assert m["precision@1"] == 1.0 and m["r_precision"] == 1.0 and m["map@r"] == 1.0
        assert m["recall@5"] == pytest.approx(6 / 10)


def test_chunking_does_not_change_results():
    x, y = clustered(12, 20, 20, spread=1.2)
    a = retrieval_metrics(x, y, nmi=False)
    b = retrieval_metrics(x, y, nmi=False, memory_mb=0.01)  # one query per chunk
    c = retrieval_metrics(x, y, nmi=False, memory_mb=0.3)
    assert a == pytest.approx(b) and a == pytest.approx(c)


def test_labels_of_any_type_and_torch_input():
    import torch

    x, y = clustered(13, 5, 20)
    names = np.array([f"class-{i}" for i in y])
    a = retrieval_metrics(x, y, nmi=False)
    assert retrieval_metrics(x, names, nmi=False) == pytest.approx(a)
    assert retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y), nmi=False) == pytest.approx(a)
    assert retrieval_metrics(x, y + 1000, nmi=False) == pytest.approx(a)


def test_values_are_python_floats_in_range():
    x, y = clustered(14, 6, 15)
    m = retrieval_metrics(x, y, ks=(1, 4))
    assert set(m) == {
        "recall@1",
        "recall@4",
        "precision@1",
        "r_precision",
        "map@r",
        "nmi",
        "n_queries",
        "n_gallery",
        "n_lone_queries",
    }
    for key, value in m.items():
        if key.startswith("n_"):
            assert type(value) is int
        else:
            assert type(value) is float and 0.0 <= value <= 1.0
    assert m["recall@1"] <= m["recall@4"]
    assert m["map@r"] <= m["r_precision"] + 1e-12  # P(i) <= 1 inside the sum


def test_k_larger_than_gallery():
    x, y = clustered(15, 2, 3)
    m = retrieval_metrics(x, y, ks=(1, 100), nmi=False)
    assert m["recall@100"] == 1.0  # every class has another item somewhere in the gallery


def test_input_validation():
    x, y = clustered(16, 3, 4)
    with pytest.raises(FinegrainError):
        retrieval_metrics(x, y, metric="manhattan")
    with pytest.raises(FinegrainError):
        retrieval_metrics(x, y[:-1])
    with pytest.raises(FinegrainError):
        retrieval_metrics(x, y, ks=(0,))
    with pytest.raises(FinegrainError):
        retrieval_metrics(x, y, query_embeddings=x[:2])
    with pytest.raises(FinegrainError):
        retrieval_metrics(x, y, query_embeddings=x[:2, :3], query_labels=y[:2])
    with pytest.raises(FinegrainError):
        retrieval_metrics(x[:1], y[:1])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(FinegrainError):
        retrieval_metrics(bad, y)


@pytest.mark.slow
def test_ten_thousand_squared_stays_small():
    """10^4 queries x 10^4 gallery with R = 999 (10 classes): chunked, so the NumPy
    working set stays near ``memory_mb`` (default 128 MB) instead of 10^4 x 10^3 x 64 B."""
    import tracemalloc

    rng = np.random.default_rng(17)
    n, d, c = 10_000, 64, 10
    y = np.repeat(np.arange(c), n // c)
    x = (rng.normal(size=(c, d))[y] + 3.0 * rng.normal(size=(n, d))).astype(np.float32)
    tracemalloc.start()
    try:
        m = retrieval_metrics(x, y, nmi=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0.0 < m["map@r"] < m["r_precision"] < 1.0 and m["n_queries"] == n
    assert peak / 2**20 < 250
