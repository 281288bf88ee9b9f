"""The ``ivfpq`` kind: IVF-PQ codes re-ranked with the stored float16 vectors, built chunk by chunk."""

from __future__ import annotations

import numpy as np
import pytest

from finegrain.retrieval.index import GalleryIndex, exact_neighbours, l2_normalize
from finegrain.retrieval.large_index import (
    VECTORS_FILE,
    RerankedIVFPQ,
    build_ivfpq,
    ivfpq_params,
    streaming_knn,
)

pytest.importorskip("faiss")

N, D = 6000, 32


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    """Clustered vectors, normalised (as the cosine metric stores them)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, D)).astype(np.float32)
    return l2_normalize(centres[rng.integers(0, 40, N)] + 0.4 * rng.normal(size=(N, D)).astype(np.float32))


def _chunks(x: np.ndarray, size: int):
    return lambda: (x[s : s + size] for s in range(0, len(x), size))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_streaming_knn_equals_brute_force(x, metric):
    q = x[:50]
    d, i = streaming_knn(q, (x[s : s + 700] for s in range(0, N, 700)), 10, metric)
    ed, ei = exact_neighbours(q, x, 10, metric)
    assert np.array_equal(i, ei)
    assert np.allclose(d, ed, atol=1e-5)


def test_params_follow_size_and_recall_target():
    big = ivfpq_params(10**7, 512, recall=0.95)
    assert big["nlist"] == 4096 and big["m"] == 64 and big["nbits"] == 8
    assert ivfpq_params(10**7, 512, recall=0.8)["m"] == 32  # a lower target: smaller codes
    small = ivfpq_params(1000, 512)
    assert small["nlist"] <= 1000 // 39 and small["nbits"] < 8  # too few points for 256 centroids


def test_built_shard_by_shard_equals_built_in_one_go(x, tmp_path):
    """The same trained quantizer, filled in one call or in uneven shards, answers the same."""
    params = ivfpq_params(N, D)
    params["nprobe"] = 8
    one = RerankedIVFPQ.empty(D, "cosine", params)
    one.train(x[: params["train_points"]])
    trained = one.serialize()
    one.add(x)
    from finegrain.faiss_import import import_faiss

    faiss = import_faiss()
    shards = RerankedIVFPQ(
        faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8)),
        "cosine",
        dict(params),
        vectors_file=tmp_path / "v.npy",
        n=N,
    )
    for lo, hi in ((0, 1), (1, 1500), (1500, 4321), (4321, N)):
        shards.add(x[lo:hi])
    q = x[::97]
    d1, i1 = one.search(q, 10)
    d2, i2 = shards.search(q, 10)
    assert np.array_equal(i1, i2)
    assert np.array_equal(d1, d2)
    assert (i1 >= 0).all()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_reranked_scores_are_exact_and_recall_meets_target(x, tmp_path, metric):
    index = build_ivfpq(_chunks(x, 1000), N, D, metric, tmp_path / "v.npy", recall=0.9)
    assert index.params["measured_recall"] >= 0.9
    q = x[1::301]
    d, i = index.search(q, 10)
    exact = (q[:, None, :] * x[i]).sum(-1) if metric == "cosine" else ((q[:, None, :] - x[i]) ** 2).sum(-1)
    assert np.allclose(d, exact, atol=2e-3)  # the float16 copy's rounding only
    order = -d if metric == "cosine" else d
    assert (np.diff(order, axis=1) >= 0).all()


def test_built_in_chunks_saves_and_loads_through_gallery_index(x, tmp_path):
    index = build_ivfpq(_chunks(x, 2500), N, D, "cosine", tmp_path / "work.npy")
    from finegrain.retrieval.index import index_meta

    meta = index_meta("c" * 64, D, "cosine", "ivfpq", N, index.params, index.params["measured_recall"], 0.0)
    gallery = GalleryIndex(index, np.arange(N) % 7, [f"{i}.jpg" for i in range(N)], None, meta)
    dest = gallery.save(tmp_path / "index")
    assert (dest / VECTORS_FILE).is_file() and not (tmp_path / "work.npy").exists()
    again = GalleryIndex.load(dest, expected_model_checksum="c" * 64)
    assert again.kind == "ivfpq" and again.n == N
    assert again.meta["approx_recall_at_10"] == index.params["measured_recall"]
    assert again.meta["bytes_per_vector"] > 2 * D  # the float16 copy and the codes
    s1, i1 = gallery.search(x[:20], 5)
    s2, i2 = again.search(x[:20], 5)
    assert np.array_equal(i1, i2) and np.allclose(s1, s2)
    assert i2[:, 0].tolist() == list(range(20))


def test_truncated_vectors_file_refused(x, tmp_path):
    gallery = GalleryIndex.build(
        x[:1000], np.zeros(1000), [f"{i}" for i in range(1000)], kind="ivfpq", model_checksum="c" * 64
    )
    dest = gallery.save(tmp_path / "index")
    data = (dest / VECTORS_FILE).read_bytes()
    (dest / VECTORS_FILE).write_bytes(data[: len(data) // 2])
    from finegrain.errors import FinegrainError

    with pytest.raises(FinegrainError, match=VECTORS_FILE):
        GalleryIndex.load(dest)
