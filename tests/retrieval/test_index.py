"""GalleryIndex: exact search, approximate recall, save/load and refusal of bad files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from finegrain.errors import FinegrainError
from finegrain.retrieval.index import GalleryIndex, ivf_params

CHECKSUM = "a" * 64


def clustered(n: int = 5000, d: int = 64, centers: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)).astype(np.float32) * 3
    labels = rng.integers(0, centers, size=n)
    x = c[labels] + rng.normal(size=(n, d)).astype(np.float32)
    return x.astype(np.float32), labels


def paths_for(n: int) -> list[str]:
    return [f"img/{i:05d}.jpg" for i in range(n)]


def brute_force(gallery: np.ndarray, queries: np.ndarray, k: int, metric: str):
    g = gallery.astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "cosine":
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        s = q @ g.T
        ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = np.sqrt(np.maximum(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1), 0))
        ids = np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, axis=1), ids


@pytest.fixture(scope="module")
def data():
    return clustered()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_flat_search_equals_brute_force(metric):
    rng = np.random.default_rng(1)
    g = rng.normal(size=(300, 16)).astype(np.float32)
    q = rng.normal(size=(20, 16)).astype(np.float32)
    idx = GalleryIndex.build(
        g, rng.integers(0, 5, 300), paths_for(300), metric=metric, kind="flat", model_checksum=CHECKSUM
    )
    assert idx.meta["approx_recall_at_10"] is None
    scores, ids = idx.search(q, 7)
    exp_scores, exp_ids = brute_force(g, q, 7, metric)
    np.testing.assert_array_equal(ids, exp_ids)
    np.testing.assert_allclose(scores, exp_scores, rtol=1e-4, atol=1e-4)
    # sign convention: cosine similarity descending, euclidean distance ascending
    assert np.all(np.diff(scores, axis=1) <= 1e-6) if metric == "cosine" else np.all(np.diff(scores, axis=1) >= -1e-6)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_approximate_recall_measured(data, kind, metric, caplog):
    x, labels = data
    with caplog.at_level(logging.INFO, logger="finegrain.retrieval.index"):
        idx = GalleryIndex.build(x, labels, paths_for(len(x)), metric=metric, kind=kind, model_checksum=CHECKSUM)
    r = idx.meta["approx_recall_at_10"]
    assert r is not None and 0.9 < r <= 1.0
    assert "recall@10" in caplog.text
    if kind == "ivf":
        nlist, nprobe = ivf_params(len(x))
        assert idx.meta["params"]["nlist"] == nlist == min(round(4 * np.sqrt(5000)), 5000 // 39)
        assert idx.meta["params"]["nprobe"] == nprobe >= 8
    else:
        assert idx.meta["params"]["M"] == 32 and idx.meta["params"]["efSearch"] == 128


def test_ivf_params_small_and_large():
    assert ivf_params(10) == (1, 1)
    nlist, nprobe = ivf_params(10**6)
    assert nlist == 4000 and nprobe == 500
    assert ivf_params(10**5) == (1265, 158)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip(tmp_path, data, kind):
    x, labels = data
    x, labels = x[:2000], labels[:2000]
    idx = GalleryIndex.build(
        x,
        labels,
        paths_for(len(x)),
        metric="cosine",
        kind=kind,
        model_checksum=CHECKSUM,
        class_names=[f"c{i}" for i in range(50)],
    )
    q = x[:50] + 0.1
    before = idx.search(q, 10)
    idx.save(tmp_path / "index")
    for name in ("index.faiss", "labels.npy", "paths.json", "meta.json"):
        assert (tmp_path / "index" / name).is_file()
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    for key in (
        "model_checksum",
        "dim",
        "metric",
        "kind",
        "n",
        "created_at",
        "approx_recall_at_10",
        "finegrain_version",
        "index_sha256",
    ):
        assert key in meta
    assert meta["created_at"].endswith("+00:00") and meta["n"] == 2000 and meta["dim"] == 64
    loaded = GalleryIndex.load(tmp_path / "index", expected_model_checksum=CHECKSUM)
    after = loaded.search(q, 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.paths == idx.paths and loaded.class_names == idx.class_names
    assert loaded.meta == idx.meta


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    idx = GalleryIndex.build(
        x, rng.integers(0, 3, 200), paths_for(200), metric="euclidean", kind="flat", model_checksum=CHECKSUM
    )
    return idx.save(tmp_path / "index")


def test_other_model_refused(saved):
    with pytest.raises(FinegrainError, match=r"built by another model.*finegrain index RUN"):
        GalleryIndex.load(saved, expected_model_checksum="b" * 64)
    GalleryIndex.load(saved)  # no expectation: accepted


def test_flipped_bytes_refused(saved):
    f = saved / "index.faiss"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(FinegrainError, match="damaged index file"):
        GalleryIndex.load(saved, expected_model_checksum=CHECKSUM)


def test_truncated_refused(saved):
    f = saved / "index.faiss"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(FinegrainError, match="damaged index file"):
        GalleryIndex.load(saved)


def test_undeserializable_refused_even_with_matching_sha(saved):
    import hashlib

    f = saved / "index.faiss"
    garbage = b"not a faiss index at all"
    f.write_bytes(garbage)
    meta = json.loads((saved / "meta.json").read_text())
    meta["index_sha256"] = hashlib.sha256(garbage).hexdigest()
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FinegrainError, match="damaged index file.*FAISS cannot read"):
        GalleryIndex.load(saved)


@pytest.mark.parametrize("name", ["index.faiss", "labels.npy", "paths.json", "meta.json"])
def test_missing_file_named(saved, name):
    (saved / name).unlink()
    with pytest.raises(FinegrainError, match=name.replace(".", r"\.")):
        GalleryIndex.load(saved)


def test_label_count_mismatch_refused(saved):
    np.save(saved / "labels.npy", np.zeros(150, dtype=np.int64))
    with pytest.raises(FinegrainError, match="150 labels for 200 vectors"):
        GalleryIndex.load(saved)


def test_dim_mismatch_refused(saved):
    meta = json.loads((saved / "meta.json").read_text())
    meta["dim"] = 16
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FinegrainError, match="dimension"):
        GalleryIndex.load(saved)


def test_k_larger_than_gallery_refused(saved):
    idx = GalleryIndex.load(saved)
    q = np.zeros((1, 8), dtype=np.float32)
    with pytest.raises(FinegrainError, match="k must be between 1 and the gallery size"):
        idx.search(q, 201)
    with pytest.raises(FinegrainError):
        idx.search(q, 0)
    assert idx.search(q, 200)[1].shape == (1, 200)


def test_query_dim_mismatch_refused(saved):
    idx = GalleryIndex.load(saved)
    with pytest.raises(FinegrainError, match="dimension"):
        idx.search(np.zeros((1, 9), dtype=np.float32), 5)


def test_build_validation():
    x = np.zeros((10, 4), dtype=np.float32)
    with pytest.raises(FinegrainError, match="labels"):
        GalleryIndex.build(x, np.zeros(9), paths_for(10), model_checksum=CHECKSUM)
    with pytest.raises(FinegrainError, match="paths"):
        GalleryIndex.build(x, np.zeros(10), paths_for(9), model_checksum=CHECKSUM)
    with pytest.raises(FinegrainError, match="unknown metric"):
        GalleryIndex.build(x, np.zeros(10), paths_for(10), metric="manhattan", model_checksum=CHECKSUM)
    with pytest.raises(FinegrainError, match="unknown index kind"):
        GalleryIndex.build(x, np.zeros(10), paths_for(10), kind="pq", model_checksum=CHECKSUM)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_tiny_gallery_approximate_kinds(kind):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 6)).astype(np.float32)
    idx = GalleryIndex.build(x, np.arange(12), paths_for(12), metric="euclidean", kind=kind, model_checksum=CHECKSUM)
    assert idx.meta["approx_recall_at_10"] == 1.0  # 12 vectors: the approximate search visits them all
    scores, ids = idx.search(x[:2], 3)
    assert ids[0, 0] == 0 and ids[1, 0] == 1 and scores[0, 0] == pytest.approx(0, abs=1e-5)


def test_faiss_blas_uses_cpu_kernels_and_leaves_environment_clean():
    """faiss-cpu's OpenBLAS 0.3.15 falls back to generic kernels on new Xeons unless steered."""
    import os
    import subprocess
    import sys

    from finegrain.faiss_import import _openblas_coretype

    code = (
        "import os\nfrom finegrain.faiss_import import faiss_blas_core, import_faiss\n"
        "import_faiss()\nprint(os.environ.get('OPENBLAS_CORETYPE'), faiss_blas_core())"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out[0] == "None"  # not leaked to the environment
    expected = _openblas_coretype()
    if expected is not None and out[1] != "None":
        assert out[1] == expected


# --------------------------------------------------------------------------- stored maps


def _with_maps(tmp_path, n: int = 30, d: int = 8, grid: tuple[int, int] = (3, 4)):
    x, labels = clustered(n=n, d=d, centers=3)
    maps = np.random.default_rng(1).normal(size=(n, d, *grid)).astype(np.float16)
    index = GalleryIndex.build(x, labels, paths_for(n), model_checksum=CHECKSUM)
    index.maps = maps
    return index.save(tmp_path / "index"), maps


def test_maps_are_saved_with_the_index_and_memory_mapped_back(tmp_path):
    d, maps = _with_maps(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["maps"]["grid"] == [3, 4] and meta["maps"]["bytes_per_image"] == 8 * 3 * 4 * 2
    back = GalleryIndex.load(d, CHECKSUM)
    assert isinstance(back.maps, np.memmap) and back.maps.dtype == np.float16
    np.testing.assert_array_equal(back.maps, maps)
    back.maps = None  # saved again without maps: the file and its entry go, in the same swap
    back.save(d)
    assert not (d / "maps.npy").exists() and "maps" not in json.loads((d / "meta.json").read_text())
    assert GalleryIndex.load(d, CHECKSUM).maps is None


def test_maps_that_do_not_match_the_index_are_refused(tmp_path):
    d, maps = _with_maps(tmp_path)
    np.save(d / "maps.npy", maps[:-1])  # one image short
    with pytest.raises(FinegrainError, match=r"damaged index file .*maps\.npy: holds float16 \[29, 8, 3, 4\]"):
        GalleryIndex.load(d, CHECKSUM)
    np.save(d / "maps.npy", maps.astype(np.float32))
    with pytest.raises(FinegrainError, match="damaged index file .*maps.npy"):
        GalleryIndex.load(d, CHECKSUM)
    (d / "maps.npy").unlink()
    with pytest.raises(FinegrainError, match="incomplete index .*maps.npy is missing"):
        GalleryIndex.load(d, CHECKSUM)
    index = GalleryIndex.build(*clustered(n=30, d=8, centers=3), paths_for(30), model_checksum=CHECKSUM)
    index.maps = maps[:, :4]  # another dimension than the vectors'
    with pytest.raises(FinegrainError, match="maps of shape"):
        index.save(tmp_path / "other")
    assert not (tmp_path / "other").exists()
