"""Embedding on a real (local) Ray: the same vectors as one process, resumable shard by shard."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'finegrain[cluster]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'finegrain[cluster]')")

from finegrain.cluster.embed import embed_on_ray
from finegrain.cluster.gallery import index_from_shards, shard_vectors
from finegrain.cluster.shards import UNREADABLE, ShardDir
from finegrain.data.module import split_for
from finegrain.inference import open_encoder
from finegrain.retrieval.gallery import embed_records
from finegrain.retrieval.index import GalleryIndex

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One Ray for the module (starting one costs about 10 s), two CPUs."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def gallery(trained_run, tmp_path_factory):
    """A copy of the trained run and a listing of its test images plus one broken file."""
    root = tmp_path_factory.mktemp("ray")
    run = root / "run"
    shutil.copytree(trained_run, run)
    encoder = open_encoder(run, "torch")
    records = split_for(encoder.cfg.data).test
    broken = root / "broken.png"
    broken.write_bytes(b"not an image")
    listing = root / "gallery.csv"
    with listing.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "id"])
        for i, r in enumerate(records[:13]):
            w.writerow([r.path, r.label, f"img{i}"])
        w.writerow([broken.name, 0, "broken"])  # relative to the listing's folder
        for i, r in enumerate(records[13:], start=13):
            w.writerow([r.path, r.label, f"img{i}"])
    plain = embed_records(encoder, records).embeddings
    return run, listing, plain, len(records)


def _vectors(folder):
    files, _, _, ids, bad = ShardDir(folder).gather()
    return np.concatenate(list(shard_vectors(files, "euclidean"))), ids, bad


def test_ray_embedding_equals_one_process_and_lists_the_unreadable(gallery):
    run, listing, plain, n = gallery
    report = embed_on_ray(run, str(listing), engine="torch", actors=2, shard_rows=5)
    assert (report.rows, report.embedded, report.unreadable) == (n + 1, n, 1)
    vectors, ids, bad = _vectors(report.folder)
    assert ids == [f"img{i}" for i in range(n)]  # every row once, in listing order
    np.testing.assert_allclose(vectors, plain, atol=1e-5)
    assert bad[0][0] == "broken" and "broken" in (report.folder / UNREADABLE).read_text()


def test_resume_skips_whole_shards_and_ends_with_the_same_vectors(gallery):
    run, listing, plain, n = gallery
    first = embed_on_ray(run, str(listing), engine="torch", actors=2, shard_rows=4)
    before, _, _ = _vectors(first.folder)
    shards = ShardDir(first.folder)
    kept = {i: shards.vectors_file(i).stat().st_mtime_ns for i in range(3)}
    # what a run killed in shard 3 leaves: shards 0-2 whole, a half-written temporary file, no more
    for i in range(3, shards.count()):
        shards.rows_file(i).unlink()
    data = shards.vectors_file(3).read_bytes()
    shards.vectors_file(3).unlink()
    (first.folder / ".shard-00003.npy.x1.tmp").write_bytes(data[: len(data) // 2])
    again = embed_on_ray(run, str(listing), engine="torch", actors=1, shard_rows=4)
    assert again.skipped == 3 and again.embedded == n
    assert {i: shards.vectors_file(i).stat().st_mtime_ns for i in range(3)} == kept
    after, ids, _ = _vectors(again.folder)
    assert ids == [f"img{i}" for i in range(n)]
    np.testing.assert_array_equal(after, before)
    index = index_from_shards(shards, run / "index", kind="ivfpq", metric="cosine", recall=0.9)
    reopened = GalleryIndex.load(run / "index")
    assert reopened.kind == "ivfpq" and reopened.n == n
    assert reopened.search(plain[:3], 1)[1][:, 0].tolist() == [0, 1, 2]
    assert index.meta["approx_recall_at_10"] is not None
    from finegrain.retrieval.searcher import Searcher

    info = Searcher(run, engine="torch").info  # what /api/info says
    assert info["index_kind"] == "ivfpq" and info["gallery_size"] == n
    assert info["index_recall_at_10"] == index.meta["approx_recall_at_10"]
    assert info["index_bytes_per_vector"] == index.meta["bytes_per_vector"] > 0


def test_a_flat_folder_is_embedded_on_ray_and_indexed_unlabelled(gallery, tmp_path):
    """A folder of images without class sub-folders: unlabelled rows, an index whose hits have no label."""
    from finegrain.cluster.gallery import build_index_on_ray
    from finegrain.data.images import open_rgb
    from finegrain.retrieval.searcher import Searcher

    run = tmp_path / "run"
    shutil.copytree(gallery[0], run)
    flat = tmp_path / "photos"
    flat.mkdir()
    for i, r in enumerate(split_for(open_encoder(run, "torch").cfg.data).test[:6]):
        shutil.copy(r.path, flat / f"photo-{i}{r.path.suffix}")
    dest, info, report = build_index_on_ray(run, str(flat), "local", engine="torch", actors=1)
    assert report.embedded == info["n"] == 6
    index = GalleryIndex.load(dest)
    assert index.labels.tolist() == [-1] * 6 and index.class_names == []
    query = sorted(flat.iterdir())[2]
    hits, top = Searcher(run, engine="torch").search(open_rgb(query)[0], k=3)
    assert hits[0].path == str(query.resolve()) and hits[0].same_image and [h.label for h in hits] == [""] * 3
    assert top is not None  # the classifier's head still names a class
