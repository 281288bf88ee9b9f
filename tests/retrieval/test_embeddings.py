"""Saved embeddings are reused only when the same model made them the same way from the same images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from finegrain.data.module import split_for
from finegrain.inference.encoder import Encoder
from finegrain.inference.load import load_model
from finegrain.retrieval.embeddings import load_embeddings, reusable_embeddings, save_embeddings
from finegrain.runs import open_run


@pytest.fixture
def run(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    return open_run(tmp_path / "run")


def test_evaluate_saved_test_embeddings_with_how_they_were_made(run):
    meta = json.loads((run.embeddings / "test.json").read_text())
    encoder = Encoder(load_model(run))
    assert {k: meta[k] for k in encoder.signature()} == encoder.signature()
    assert meta["model_checksum"] == encoder.loaded.checksum
    emb, labels, paths = load_embeddings(run, "test")
    assert emb.shape == (meta["n"], meta["dim"]) and len(labels) == len(paths) == meta["n"]


def test_reused_only_when_model_sizes_precision_and_images_match(run):
    encoder = Encoder(load_model(run))  # the precision this machine infers in, as the run's evaluation did
    made_in = encoder.precision
    records = split_for(encoder.cfg.data).test
    assert reusable_embeddings(run, "test", records, encoder) is not None
    assert reusable_embeddings(run, "test", records[1:], encoder) is None  # other images
    other_precision = Encoder(load_model(run), precision="bf16-mixed" if made_in == "32" else "32")
    assert reusable_embeddings(run, "test", records, other_precision) is None
    other_sizes = Encoder(load_model(run), precision=made_in)
    other_sizes.sizes = [(40, 40)]
    assert reusable_embeddings(run, "test", records, other_sizes) is None
    flips = Encoder(load_model(run), precision=made_in)
    flips.tta_flip = not flips.tta_flip
    assert reusable_embeddings(run, "test", records, flips) is None


def test_saved_and_loaded_vectors_are_the_same(run):
    encoder = Encoder(load_model(run), precision="32")
    records = split_for(encoder.cfg.data).test[:6]
    out = encoder.encode_records(records, description="test")
    save_embeddings(run, "val", out, [str(records[i].path) for i in out.indices], encoder)
    emb, labels, paths = load_embeddings(run, "val")
    np.testing.assert_array_equal(emb, out.embeddings)
    np.testing.assert_array_equal(labels, out.labels)
    assert paths == [str(r.path) for r in records]


def test_a_damaged_sidecar_means_embed_again(run):
    encoder = Encoder(load_model(run), precision="32")
    records = split_for(encoder.cfg.data).test
    (run.embeddings / "test.json").write_text("{not json")
    assert reusable_embeddings(run, "test", records, encoder) is None
