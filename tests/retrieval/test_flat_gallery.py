"""A folder of images without class sub-folders, indexed as an unlabelled gallery: the neighbours are
found, served and imported into a living gallery; only a classifier (or labelled neighbours) predicts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.cluster.sources import read_source
from finegrain.data.images import open_rgb
from finegrain.gallery.live import AddRequest, ImageBytes, LiveGallery
from finegrain.retrieval.gallery import build_index
from finegrain.retrieval.index import GalleryIndex
from finegrain.retrieval.searcher import Searcher, label_name
from finegrain.runs import open_run
from finegrain.tasks import engine
from tests.conftest import tiny_metric_config
from tests.serve.fakes import make_app, post_image
from tests.test_runs import run_cli

N = 10


@pytest.fixture(scope="module")
def metric_run(tmp_path_factory) -> Path:
    """A tiny metric-learning run: it predicts by its neighbours' vote."""
    root = tmp_path_factory.mktemp("flat-ml")
    run, _ = engine.fit(tiny_metric_config(root, name="ml"), runs_root=root / "runs")
    return run.path


def flat_copy(trained_run: Path, folder: Path) -> Path:
    """``folder`` holding ``N`` images directly, no class sub-folder: the trained run's gallery images
    mirrored (so that no image is already in a store made from its index)."""
    folder.mkdir()
    paths = json.loads((trained_run / "index" / "paths.json").read_text())["paths"]
    for i, p in enumerate(paths[:N]):
        open_rgb(p)[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / f"photo-{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def photo(folder: Path, i: int) -> Path:
    """The ``i``-th image :func:`flat_copy` wrote."""
    [path] = folder.glob(f"photo-{i:02d}.*")
    return path


def test_a_classifier_run_indexes_searches_and_serves_a_flat_folder(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    flat = flat_copy(trained_run, tmp_path / "photos")
    r = CliRunner().invoke(app, ["index", str(run), "--gallery", str(flat), "--replace", "--engine", "torch"])
    assert r.exit_code == 0, r.output
    assert f"indexed {N} images" in r.output and f"from all images of {flat.resolve()} (unlabelled)" in r.output
    index = GalleryIndex.load(run / "index")
    assert index.labels.tolist() == [-1] * N and index.class_names == []

    searcher = Searcher(run, engine="torch")
    query = open_rgb(photo(flat, 3))[0]
    hits, top = searcher.search(query, k=4)
    assert hits[0].path == str(photo(flat, 3).resolve()) and hits[0].same_image
    assert [h.label for h in hits] == [""] * 4
    _, probs = searcher.encode(query)  # the head still names the class
    assert top is not None and top[0] == (searcher.class_names[int(np.argmax(probs))], pytest.approx(probs.max()))

    with TestClient(make_app(searcher)) as c:
        assert c.get("/api/info").json()["gallery_size"] == N
        body = post_image(c, photo(flat, 3).read_bytes(), k=3).json()
        assert [x["label"] for x in body["results"]] == ["", "", ""] and body["results"][0]["same_image"]
        assert body["prediction"][0]["label"] == top[0][0]
        assert c.get(body["results"][0]["url"]).content == photo(flat, 3).read_bytes()

    live = LiveGallery(run, engine="torch")  # the store imports the index: its entries have no label either
    try:
        assert live.gallery_size == N and live.store.labels() == {"": N}
        hits, top = live.search(query, k=3)
        assert [h.label for h in hits] == ["", "", ""] and hits[0].same_image and top is not None
    finally:
        live.store.close()


def test_neighbours_without_labels_predict_nothing_and_labelled_ones_vote(metric_run, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(metric_run, run)
    flat = flat_copy(trained_run, tmp_path / "photos")
    build_index(run, gallery=str(flat), engine="torch")
    query = photo(flat, 5)

    searcher = Searcher(run, engine="torch")
    assert searcher.prediction_source == "neighbours"
    hits, top = searcher.search(open_rgb(query)[0], k=N)
    assert len(hits) == N and top is None
    with TestClient(make_app(searcher)) as c:
        body = post_image(c, query.read_bytes(), k=5).json()
        assert body["prediction"] is None and len(body["results"]) == 5

    r = CliRunner().invoke(app, ["search", str(run), str(query), "--k", "3", "--engine", "torch"])
    assert r.exit_code == 0, r.output
    assert "no prediction: none of the nearest gallery images has a label" in r.output
    assert r.output.count("(unlabelled)") == 3

    live = LiveGallery(run, engine="torch")
    try:
        assert live.search(open_rgb(query)[0], k=N)[1] is None
        other = photo(flat, 7).read_bytes()
        [[new_id]] = live.add_many([AddRequest([ImageBytes(other + b"\0", "tagged.png")], "owl")])
        hits, top = live.search(open_rgb(query)[0], k=N + 1)  # every entry: ten unlabelled, one "owl"
        assert new_id in [h.id for h in hits]
        assert top == [("owl", 1.0)]  # the share of the labelled neighbours
    finally:
        live.store.close()


def test_gallery_add_of_a_flat_folder_stores_unlabelled_images(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    flat = flat_copy(trained_run, tmp_path / "photos")
    first = photo(flat, 0)
    first.rename(flat / first.name.upper())  # any case of extension
    store = tmp_path / "store"
    r = CliRunner().invoke(app, ["gallery", "add", str(run), str(flat), "--store", str(store), "--engine", "torch"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["gallery", "list", str(run), "--store", str(store), "--json", "--limit", "500"])
    entries = json.loads(r.stdout)["entries"]
    files = {e["metadata"]["file"]: e["label"] for e in entries if "photo" in e["metadata"]["file"].lower()}
    assert files == {first.name.upper(): ""} | {photo(flat, i).name: "" for i in range(1, N)}


def test_a_ray_listing_of_a_flat_folder_has_no_labels(trained_run, tmp_path):
    flat = flat_copy(trained_run, tmp_path / "photos")
    listing = read_source(str(flat), open_run(trained_run).load_config())
    assert len(listing) == N and listing.labels.tolist() == [-1] * N and listing.class_names == []
    assert "(unlabelled)" in listing.description


@pytest.mark.parametrize(("files", "held"), [({}, "holds no image"), ({"a.txt": "x"}, "holds 1 file(s) but no image")])
def test_a_flat_folder_without_images_is_refused_in_one_line(trained_run, tmp_path, monkeypatch, capsys, files, held):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    empty = tmp_path / "photos"
    empty.mkdir()
    for name, text in files.items():
        (empty / name).write_text(text)
    code, err = run_cli(monkeypatch, capsys, "index", str(run), "--gallery", str(empty), "--engine", "torch")
    assert code != 0 and f"{empty.resolve()} {held}: put image files" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_index_label_is_named_empty_when_unlabelled_and_by_number_when_unnamed():
    """Listings without a label column give -1, listings of class numbers give labels no name covers."""
    assert [label_name(["owl", "cat"], i) for i in (-1, 0, 1, 2)] == ["", "owl", "cat", "2"]
    assert [label_name(None, i) for i in (-1, 7)] == ["", "7"]
