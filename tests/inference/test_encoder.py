"""The one inference path: precision chosen by the machine, one image or a loader giving the same vectors."""

from __future__ import annotations

import numpy as np
import pytest

import finegrain.machine as machine
from finegrain.data.images import open_rgb
from finegrain.inference.encoder import Encoder
from finegrain.inference.load import load_model


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(machine, "cuda_available", lambda: False)
    monkeypatch.delenv("FINEGRAIN_PRECISION", raising=False)


@pytest.mark.parametrize("native_bf16, expected", [(False, "32"), (True, "bf16-mixed")])
def test_a_run_trained_in_bf16_infers_in_what_this_machine_runs_fastest(
    trained_run, monkeypatch, no_gpu, native_bf16, expected
):
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: native_bf16)
    loaded = load_model(trained_run)
    loaded.cfg = loaded.cfg.model_copy(
        update={"train": loaded.cfg.train.model_copy(update={"precision": "bf16-mixed"})}
    )
    encoder = Encoder(loaded)
    assert encoder.precision == expected
    assert encoder.signature()["precision"] == expected


def test_an_explicit_inference_precision_is_obeyed(trained_run, monkeypatch, no_gpu):
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: False)
    assert Encoder(load_model(trained_run), precision="bf16-mixed").precision == "bf16-mixed"
    monkeypatch.setenv("FINEGRAIN_PRECISION", "bf16-mixed")
    assert Encoder(load_model(trained_run)).precision == "bf16-mixed"


def test_one_image_and_a_loader_of_it_give_the_same_vectors(trained_run):
    encoder = Encoder(load_model(trained_run), precision="32")
    from finegrain.data.module import split_for

    records = split_for(encoder.cfg.data).test[:5]
    batch = encoder.encode_records(records, description="test")
    for row, i in enumerate(batch.indices):
        single = encoder.encode_rgb(open_rgb(records[i].path)[0])
        np.testing.assert_allclose(single["embedding"][0], batch.embeddings[row], atol=1e-4)
        np.testing.assert_allclose(single["logits"][0], batch.logits[row], atol=1e-3)


def test_sizes_are_averaged_for_one_image_as_for_a_loader(trained_run):
    loaded = load_model(trained_run)
    loaded.cfg = loaded.cfg.model_copy(
        update={"data": loaded.cfg.data.model_copy(update={"eval_image_sizes": [(32, 32), (40, 48)]})}
    )
    encoder = Encoder(loaded, precision="32")
    assert encoder.sizes == [(32, 32), (40, 48)]
    from finegrain.data.module import split_for

    record = split_for(encoder.cfg.data).test[0]
    rgb = open_rgb(record.path)[0]
    single = encoder.encode_rgb(rgb)
    by_loader = encoder.encode_records([record], description="test")
    np.testing.assert_allclose(single["embedding"], by_loader.embeddings, atol=1e-4)
    per_size = []
    for size in encoder.sizes:
        one = Encoder(loaded, precision="32")
        one.sizes = [size]
        per_size.append(one.encode_rgb(rgb)["embedding"])
    assert not np.allclose(per_size[0], per_size[1], atol=1e-3)
    np.testing.assert_allclose(single["embedding"], np.mean(per_size, axis=0), atol=1e-5)


@pytest.mark.parametrize("tta_flip, most", [(True, 16), (False, 32)])
def test_a_large_batch_runs_in_slices_that_bound_memory(tta_flip, most):
    """Activations grow with the pass: a loader's batch of 70 runs in passes of at most 32 images,
    mirrors included, and gives the outputs of one pass in the loader's order."""
    from finegrain.inference.outputs import PASS_IMAGES, EncodingLoop

    class Probe(EncodingLoop):
        def __init__(self):
            self.tta_flip, self.seen = tta_flip, []

        def forward(self, x):
            self.seen.append(len(x))
            v = np.asarray(x, dtype=np.float32).reshape(len(x), -1)[:, :4]
            return {"features": v, "embedding": v * 2}

    x = np.random.default_rng(0).integers(0, 256, (70, 3, 4, 4), dtype=np.uint8)
    loader = [(x, np.arange(70) % 3, np.arange(70)), None, (x[:5], np.zeros(5), np.arange(70, 75))]
    probe = Probe()
    out = probe.run_loader(loader)
    assert PASS_IMAGES == 32 and max(probe.seen) == most and sum(probe.seen) == 75
    whole = x.reshape(70, -1)[:, :4].astype(np.float32)
    np.testing.assert_array_equal(out.features[:70], whole)
    np.testing.assert_array_equal(out.embeddings[:70], whole * 2)
    np.testing.assert_array_equal(out.indices, np.arange(75))
