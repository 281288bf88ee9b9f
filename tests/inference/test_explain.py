"""Maps of what a model looked at: their means are the model's outputs, torch and ONNX Runtime give the
same maps, an export made before maps asks for a re-export, and a trained model's map finds the
patch that decides the class."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from finegrain.data.images import open_rgb
from finegrain.inference import open_encoder
from finegrain.inference.explain import (
    VIRIDIS,
    NeedsReexport,
    class_activation_map,
    colorize,
    explain_rgb,
    pair_maps,
    similarity_map,
    to_unit,
)
from finegrain.inference.load import file_sha256, load_model
from finegrain.models.maps import forward_with_maps
from finegrain.models.model import FinegrainModel, build_model
from finegrain.runs import RunDir
from finegrain.tasks import engine
from finegrain.tasks.export import export_run
from tests.conftest import tiny_config, tiny_metric_config

BACKBONE = "timm:test_efficientnet"  # a 0.1M-parameter timm EfficientNet: global-pooled, so it has maps


@pytest.mark.parametrize("head", ["classifier", "cosine", "embedding", "both"])
def test_the_mean_of_a_map_is_the_models_output(head):
    """Per location through the heads' linear part: averaged over the locations, the class map is the
    logits and the embedding map the (normalised) embedding, for every head."""
    torch.manual_seed(0)
    model = build_model(BACKBONE, num_classes=5, head=head, embedding_dim=8, bn_neck=True).eval()
    model.embedder is not None and nn.init.normal_(model.embedder.bn.running_mean)  # a BN neck that shifts
    x = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        out = forward_with_maps(model, x)
    assert out["embedding_map"].shape[2:] == (3, 3)
    embedding = out.get("embedding", out["features"] / out["features"].norm(dim=1, keepdim=True))
    torch.testing.assert_close(out["embedding_map"].mean((2, 3)), embedding, atol=1e-5, rtol=1e-4)
    if head != "embedding":
        torch.testing.assert_close(out["class_map"].mean((2, 3)), out["logits"], atol=1e-4, rtol=1e-4)
    else:
        assert "class_map" not in out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> RunDir:
    root = tmp_path_factory.mktemp("explain-cls")
    cfg = tiny_config(
        root, name="cam", model={"backbone": BACKBONE}, data={"image_size": [64, 64]}, train={"epochs": 1}
    )
    run, _ = engine.fit(cfg, runs_root=root)
    export_run(run.path)
    return run


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory) -> RunDir:
    """An embedding model with a BN neck, tested at two sizes with flip averaging."""
    root = tmp_path_factory.mktemp("explain-ml")
    cfg = tiny_metric_config(
        root,
        name="sim",
        data={"synthetic": {"num_classes": 4}, "image_size": [64, 64], "eval_image_sizes": [[96, 96], [64, 64]]},
        model={"backbone": BACKBONE, "bn_neck": True},
        eval={"tta_flip": True},
    )
    run, _ = engine.fit(cfg, runs_root=root)
    export_run(run.path)
    return run


def _test_images(run: RunDir, n: int):
    from finegrain.data.module import split_for

    return [open_rgb(r.path)[0] for r in split_for(load_model(run).cfg.data).test[:n]]


@pytest.mark.slow
def test_torch_and_onnx_give_the_same_class_activation_maps(classifier):
    meta = json.loads((classifier.path / "export" / "model.json").read_text())
    assert meta["outputs"] == ["features", "embedding", "logits", "embedding_map", "class_map"]
    t, o = open_encoder(classifier, "torch", "32"), open_encoder(classifier, "onnx")
    for image in _test_images(classifier, 3):
        a, b = explain_rgb(t, image), explain_rgb(o, image)
        assert a.predicted_class == b.predicted_class
        cam_t, cam_o = class_activation_map(a, size=(64, 64)), class_activation_map(b, size=(64, 64))
        assert cam_t.shape == (64, 64) and np.ptp(cam_t) > 0
        np.testing.assert_allclose(cam_o, cam_t, atol=1e-4 * max(1.0, np.abs(cam_t).max()), rtol=0)
        # the map is the predicted class's: at the one size the plain map's mean is its logit, the
        # contrastive one's its logit minus the probability-weighted mean logit
        z = a.outputs["logits"][0]
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(class_activation_map(a, contrastive=False).mean(), z.max(), rtol=1e-4)
        np.testing.assert_allclose(class_activation_map(a).mean(), z.max() - p @ z, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_torch_and_onnx_give_the_same_similarity_maps_at_two_sizes_with_flips(retrieval):
    t, o = open_encoder(retrieval, "torch", "32"), open_encoder(retrieval, "onnx")
    assert t.sizes == [(96, 96), (64, 64)] and t.tta_flip
    query, hit = _test_images(retrieval, 2)
    (qt, ht), (qo, ho) = ((explain_rgb(e, query), explain_rgb(e, hit)) for e in (t, o))
    assert [m.shape[1:] for m in qt.maps["embedding_map"]] == [(3, 3), (2, 2)]
    for got, want in zip(pair_maps(qo, ho, (96, 96)), pair_maps(qt, ht, (96, 96)), strict=True):
        assert np.ptp(want) > 0
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # each size's map averages to that size's cosine similarity; the maps of both sizes, to about their mean
    cosine = float(qt.embedding @ ht.embedding)
    assert abs(similarity_map(qt, ht.embedding).mean() - cosine) < 0.05


@pytest.mark.slow
def test_an_export_made_before_maps_asks_for_a_reexport(classifier, tmp_path):
    from finegrain.inference.export import export_onnx

    run = RunDir(shutil.copytree(classifier.path, tmp_path / "old"))
    loaded = load_model(run)
    model_file = run.path / "export" / "model.onnx"
    model_file.write_bytes(export_onnx(loaded, (64, 64), maps=False))
    meta_file = run.path / "export" / "model.json"
    meta = json.loads(meta_file.read_text())
    meta["files"]["fp32"]["sha256"] = file_sha256(model_file)
    meta_file.write_text(json.dumps(meta))
    o = open_encoder(run, "onnx")
    image = _test_images(run, 1)[0]
    assert o.encode_rgb(image)["logits"].shape == (1, 4)  # plain answers still work
    with pytest.raises(NeedsReexport, match=r"run `finegrain export RUN` again"):
        explain_rgb(o, image)


@pytest.mark.slow
def test_maps_stored_at_index_time_explain_as_a_second_pass_would_in_one_pass(retrieval, tmp_path, monkeypatch):
    """The index stores each gallery image's map (two sizes, flips): an explained search runs the model
    once, over the query, and gives the maps that running every hit again gives."""
    from finegrain.retrieval.explain_search import SearchExplainer
    from finegrain.retrieval.gallery import build_index
    from finegrain.retrieval.searcher import Searcher

    _, info = build_index(retrieval.path, gallery="test", engine="onnx", out_dir=tmp_path / "index")
    assert info["maps"]["grid"] == [3, 3] and info["maps"]["bytes_per_image"] == 16 * 9 * 2
    searcher = Searcher(retrieval.path, tmp_path / "index", engine="onnx")
    assert isinstance(searcher.index.maps, np.memmap) and searcher.index.maps.shape == (searcher.gallery_size, 16, 3, 3)
    assert searcher.info["explain"] == {"available": True, "reason": None, "stored_maps": True}
    query = _test_images(retrieval, 1)[0]
    explainer, encoder = SearchExplainer(searcher), searcher.encoder
    calls: list[str] = []
    for name in ("forward", "forward_maps"):
        real = getattr(encoder, name)
        monkeypatch.setattr(encoder, name, lambda x, real=real, name=name: calls.append(name) or real(x))
    hits, top, why = explainer.search(query, k=4)
    assert calls == ["forward_maps"] * len(encoder.sizes)  # one pass per size, of the query alone
    monkeypatch.undo()
    plain_hits, plain_top = searcher.search(query, k=4)
    assert [(h.id, round(h.score, 4)) for h in hits] == [(h.id, round(h.score, 4)) for h in plain_hits]
    assert top == plain_top and why.kind == "similarity" and [h.id for h in why.hits] == [h.id for h in hits]
    q = explain_rgb(encoder, query)
    for got, hit in zip(why.hits, hits, strict=True):  # the definition: each hit's image run again
        image = open_rgb(hit.path)[0]
        h = explain_rgb(encoder, image)
        assert got.similarity == pytest.approx(hit.score, abs=2e-3) and got.image_size == (image.height, image.width)
        want = to_unit(similarity_map(h, q.embedding, (3, 3))), to_unit(similarity_map(q, h.embedding, (3, 3)))
        assert np.ptp(want[0]) > 0 and np.ptp(want[1]) > 0
        np.testing.assert_allclose(got.map, want[0], atol=0.02)
        np.testing.assert_allclose(got.query_map, want[1], atol=0.02)
    searcher.index.maps = None  # an index without maps: the hits run again, to the same maps
    again = explainer.explain(query, [h.id for h in hits])
    for a, b in zip(again.hits, why.hits, strict=True):
        np.testing.assert_allclose(a.map, b.map, atol=0.02)
        np.testing.assert_allclose(a.query_map, b.query_map, atol=0.02)


# --------------------------------------------------------------------------- the painted patch

PATCH = 8
STEPS = 60
SIDE = 32


class _PatchNet(nn.Module):
    """Three convolutions to an 8x8 map of a 32x32 image, then a global average pool (as torchvision's)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, 2, 1),
            nn.ReLU(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.body(x)).flatten(1))


def _patch_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy grey images with a red (class 1) or green (class 0) patch and a white one elsewhere that
    tells nothing; returns (images uint8 [N, 3, 32, 32], labels, top-left corners of the coloured patch)."""
    x = rng.integers(70, 150, (n, 3, SIDE, SIDE)).astype(np.uint8)
    y = rng.integers(0, 2, n)
    corners = np.zeros((n, 2), dtype=int)
    for i in range(n):
        while True:
            a, b = rng.integers(0, SIDE - PATCH + 1, (2, 2))
            if abs(a[0] - b[0]) >= PATCH or abs(a[1] - b[1]) >= PATCH:  # the two patches do not overlap
                break
        x[i, :, a[0] : a[0] + PATCH, a[1] : a[1] + PATCH] = np.array([230, 20, 20] if y[i] else [20, 230, 20])[
            :, None, None
        ]
        x[i, :, b[0] : b[0] + PATCH, b[1] : b[1] + PATCH] = 255
        corners[i] = a
    return x, y, corners


def test_a_trained_models_map_peaks_on_the_patch_that_decides_the_class():
    """A model that must find a coloured patch to tell the classes apart: its class activation map
    peaks on that patch (a constant map, or a random one, peaks there for about 6% of images)."""
    from finegrain.inference.explain import ImageMaps

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = FinegrainModel(_PatchNet(), 16, classifier=nn.Sequential(nn.Dropout(0.0), nn.Linear(16, 2)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        x, y, _ = _patch_images(32, rng)
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x))["logits"], torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, corners = _patch_images(64, rng)
    with torch.no_grad():
        out = {k: v.numpy() for k, v in forward_with_maps(model, torch.from_numpy(x)).items()}
    assert (out["logits"].argmax(1) == y).mean() >= 0.9  # it learned the task
    hits = 0
    for i in range(len(x)):
        image = ImageMaps({"logits": out["logits"][i : i + 1]}, {"class_map": [out["class_map"][i]]})
        cam = class_activation_map(image, size=(SIDE, SIDE))
        r, c = np.unravel_index(np.argmax(cam), cam.shape)
        top, left = corners[i]
        hits += int(top - 1 <= r <= top + PATCH and left - 1 <= c <= left + PATCH)
    assert hits / len(x) >= 0.8


def test_display_scales_each_map_to_its_own_range_in_viridis():
    m = np.array([[0.0, 2.0], [4.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(to_unit(m), [[0, 0.5], [1, 1]])
    assert not to_unit(np.full((2, 2), 3.0)).any()  # a constant map shows nothing, not a division by zero
    c = colorize(to_unit(m))
    assert c.dtype == np.uint8 and c.shape == (2, 2, 3)
    assert tuple(c[0, 0]) == (0x44, 0x01, 0x54) and tuple(c[1, 1]) == (0xFD, 0xE7, 0x25)  # viridis' ends
    assert np.all(
        np.diff(VIRIDIS.astype(int) @ np.array([299, 587, 114])) >= -1000
    )  # lighter as it grows (±1 rounding)
