"""The Searcher: one image in, the nearest gallery images and the predicted class out."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from finegrain.data.images import open_rgb
from finegrain.errors import FinegrainError
from finegrain.retrieval.searcher import SAME_IMAGE_MIN_COSINE, Hit, Searcher, could_be_copies


@pytest.fixture
def searcher(trained_run, tmp_path) -> Searcher:
    shutil.copytree(trained_run, tmp_path / "run")
    return Searcher(tmp_path / "run", engine="torch")


def test_a_gallery_image_finds_itself_first_marked_same_image(searcher):
    path = searcher.gallery_path(2)
    hits, top = searcher.search(open_rgb(path)[0], k=4)
    assert [h.rank for h in hits] == [1, 2, 3, 4]
    assert hits[0].path == path and hits[0].same_image and not any(h.same_image for h in hits[1:])
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)  # cosine: higher first


def test_only_hits_that_could_be_a_copy_are_read_for_same_image(searcher):
    hits, _ = searcher.search(open_rgb(searcher.gallery_path(2))[0], k=4)
    assert set(searcher._fingerprints) == {h.id for h in hits if h.score >= SAME_IMAGE_MIN_COSINE}
    scored = [Hit(rank=r, id=r, label="a", score=s, path="") for r, s in enumerate([1.0, 0.985, 0.9, 0.2])]
    assert [h.id for h in could_be_copies(scored, "cosine", 1.0)] == [0, 1]
    # Euclidean: the same angle, whatever the embeddings' length
    far = [Hit(rank=r, id=r, label="a", score=s, path="") for r, s in enumerate([0.0, 1.5, 2.5, 30.0])]
    assert [h.id for h in could_be_copies(far, "euclidean", 10.0)] == [0, 1]
    assert [h.id for h in could_be_copies(far, "euclidean", 1.0)] == [0]


def test_a_classifier_run_names_the_class_with_its_head(searcher):
    assert searcher.prediction_source == "classifier"
    query = open_rgb(searcher.gallery_path(0))[0]
    _, top = searcher.search(query, k=3)
    _, probs = searcher.encode(query)
    order = np.argsort(-probs)[:5]
    assert [n for n, _ in top] == [searcher.class_names[c] for c in order]
    assert [p for _, p in top] == pytest.approx(probs[order].tolist())


def test_a_mirrored_or_resized_query_is_not_the_same_image(searcher):
    path = searcher.gallery_path(1)
    img = Image.open(path).convert("RGB")
    hits, _ = searcher.search(img.transpose(Image.FLIP_LEFT_RIGHT).resize((img.width + 7, img.height)), k=3)
    assert not any(h.same_image for h in hits)


def test_k_outside_the_gallery_is_refused(searcher):
    q = open_rgb(searcher.gallery_path(0))[0]
    for k in (0, searcher.gallery_size + 1):
        with pytest.raises(FinegrainError, match="gallery size"):
            searcher.search(q, k=k)


def test_encode_gives_the_encoders_vector_and_its_softmax(searcher):
    query = open_rgb(searcher.gallery_path(0))[0]
    emb, probs = searcher.encode(query)
    out = searcher.encoder.encode_rgb(query)
    np.testing.assert_allclose(emb, out["embedding"], atol=1e-6)
    z = out["logits"][0]
    np.testing.assert_allclose(probs, np.exp(z - z.max()) / np.exp(z - z.max()).sum(), atol=1e-6)


def test_info_names_no_server_path(searcher):
    text = repr(searcher.info)
    assert str(searcher.run.path) not in text and "/" not in str(searcher.info.get("dataset", ""))
    assert searcher.info["engine"] == "torch" and searcher.info["gallery_size"] == searcher.gallery_size


def test_share_cores_gives_each_concurrent_search_its_share(searcher, monkeypatch):
    import torch

    from finegrain import machine

    before = torch.get_num_threads()
    monkeypatch.setattr(machine, "cores", lambda: 4)
    try:
        assert searcher.share_cores(2) == 2 and torch.get_num_threads() == 2
        assert searcher.share_cores(8) == 1 and torch.get_num_threads() == 1
        hits, _ = searcher.search(open_rgb(searcher.gallery_path(0))[0], k=2)
        assert hits[0].same_image
    finally:
        torch.set_num_threads(before)


def _rewrite_paths(index_dir, edit) -> None:
    """Edit paths.json as a stranger would, meta.json's sha256 of it included."""
    import hashlib
    import json

    data = json.loads((index_dir / "paths.json").read_text())
    edit(data["paths"])
    raw = (json.dumps(data) + "\n").encode()
    (index_dir / "paths.json").write_bytes(raw)
    meta = json.loads((index_dir / "meta.json").read_text())
    meta["files_sha256"]["paths.json"] = hashlib.sha256(raw).hexdigest()
    (index_dir / "meta.json").write_text(json.dumps(meta))


def test_the_service_hands_out_only_files_in_the_recorded_gallery_folder(trained_run, tmp_path):
    from fastapi.testclient import TestClient

    from tests.serve.fakes import make_app

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    Image.new("RGB", (20, 20), "red").save(secret)

    def point_at_secret(paths: list) -> None:
        paths[0] = str(secret)

    _rewrite_paths(run / "index", point_at_secret)
    searcher = Searcher(run, engine="torch")
    assert searcher.gallery_root == searcher.gallery_root.resolve() and not secret.is_relative_to(searcher.gallery_root)
    with TestClient(make_app(searcher)) as client:
        assert client.get("/gallery/1").status_code == 200
        r = client.get("/gallery/0")
        assert r.status_code == 404 and r.content != secret.read_bytes()
    with pytest.raises(FinegrainError, match="outside the gallery folder"):
        searcher.gallery_path(0)


def test_an_index_whose_paths_are_not_strings_is_refused_in_one_line(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)

    def number(paths: list) -> None:
        paths[3] = 5

    _rewrite_paths(run / "index", number)
    with pytest.raises(FinegrainError, match=r"paths\.json: path 3 is not a string"):
        Searcher(run, engine="torch")


def test_same_image_is_decided_by_content_and_an_engine_mismatch_warns(trained_run, tmp_path, caplog):
    """The index records the engine and precision it was built with; a search in another precision
    says so, and marks each gallery image's own copy (and nothing else) whatever the scores."""
    import json
    import logging

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    meta = json.loads((run / "index" / "meta.json").read_text())
    assert meta["engine"] == "torch" and meta["precision"] in ("32", "bf16-mixed")
    other = "bf16-mixed" if meta["precision"] == "32" else "32"
    with caplog.at_level(logging.WARNING, logger="finegrain.retrieval.searcher"):
        searcher = Searcher(run, engine="torch", precision=other)
    assert f"built with torch in {meta['precision']} and this search runs torch in {other}" in caplog.text
    for i in range(searcher.gallery_size):
        hits, _ = searcher.search(open_rgb(searcher.gallery_path(i))[0], k=3)
        assert [h.id for h in hits if h.same_image] == [i]
    image = open_rgb(searcher.gallery_path(0))[0].copy()
    image.putpixel((0, 0), tuple(255 - v for v in image.getpixel((0, 0))))  # one pixel differs: not the same
    hits, _ = searcher.search(image, k=3)
    assert hits[0].id == 0 and not any(h.same_image for h in hits)
