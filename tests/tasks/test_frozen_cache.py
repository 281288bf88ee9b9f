"""Training on cached outputs of the frozen stages (``train.frozen_cache_views``): the split forward
pass, the cache's views, their seeded draw, tiny runs of both tasks, and the config's refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from finegrain.config import build_config
from finegrain.data.frozen_features import FrozenViewDataset, build_frozen_views
from finegrain.data.module import FinegrainDataModule, make_loader
from finegrain.data.records import ImageRecord
from finegrain.errors import ConfigError
from finegrain.models.build import build_from_config
from finegrain.models.freezing import apply_freeze
from finegrain.models.model import build_model
from finegrain.tasks import engine
from finegrain.tasks.evaluate import evaluate_run
from tests.conftest import tiny_config, tiny_metric_config


# ---------------------------------------------------------------------- (a) the split forward pass
@pytest.mark.parametrize(
    "backbone, stages",
    [
        ("efficientnet_lite0", 1),
        ("efficientnet_lite0", 3),
        ("efficientnet_lite0", 5),
        ("resnet18", 1),
        ("resnet18", 2),
        ("resnet18", 4),
        ("timm:resnet10t", 2),
    ],
)
@pytest.mark.slow
def test_frozen_prefix_then_the_rest_is_the_whole_model(backbone, stages):
    torch.manual_seed(0)
    model = apply_freeze(build_model(backbone, num_classes=5, head="both", embedding_dim=8), "none", stages).eval()
    x = torch.randint(0, 256, (3, 3, 64, 80), dtype=torch.uint8)
    with torch.no_grad():
        f = model.frozen_prefix(model.normalise_input(x))
        assert f.dim() == 4 and f.shape[1] != 3  # a stage's output, not the images
        torch.testing.assert_close(model.features_from_frozen(f), model.features(x), atol=1e-5, rtol=1e-5)
        whole, split = model(x), model(f, frozen=True)
        assert whole.keys() == split.keys() == {"features", "embedding", "logits"}
        for k in whole:
            torch.testing.assert_close(split[k], whole[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.logits(f, frozen=True), model.logits(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.embed(f, frozen=True), model.embed(x), atol=1e-5, rtol=1e-5)
        # a cropped map still gives features of the right width (global pooling follows)
        assert model.features_from_frozen(f[:, :, 1:, 1:]).shape == (3, model.feature_dim)


def test_a_backbone_whose_forward_pass_cannot_be_split_is_named():
    model = apply_freeze(build_model("timm:ghostnet_100", num_classes=3), "none", 1)
    with pytest.raises(ConfigError, match="frozen_cache_views.*GhostNet"):
        model.frozen_prefix(torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------------- (b) a classification run
class SpyOnBatches(Callback):
    """Records every training batch's inputs, and how often ``module`` ran during training steps."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.dtype, tuple[int, ...], list[int]]] = []
        self.calls = 0
        self.calls_in_steps = 0
        self._at_start = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.model.backbone.conv1.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((batch[0].dtype, tuple(batch[0].shape), batch[1].tolist()))
        self._at_start = self.calls

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.calls_in_steps += self.calls - self._at_start


@pytest.fixture
def spy(monkeypatch):
    """A :class:`SpyOnBatches` on the next ``engine.fit``, and the model's weights when it was built."""
    spy, start = SpyOnBatches(), {}
    make_task, trainer_for = engine.make_task, engine.trainer_for

    def recording_make_task(*args, **kwargs):
        task = make_task(*args, **kwargs)
        start.update({k: v.clone() for k, v in task.model.state_dict().items()})
        return task

    def spying_trainer(*args, **kwargs):
        trainer = trainer_for(*args, **kwargs)
        trainer.callbacks.append(spy)
        return trainer

    monkeypatch.setattr(engine, "make_task", recording_make_task)
    monkeypatch.setattr(engine, "trainer_for", spying_trainer)
    return spy, start


@pytest.mark.slow
def test_classification_trains_on_the_cache_and_leaves_a_normal_checkpoint(tmp_path, spy):
    spy, start = spy
    cfg = tiny_config(
        tmp_path,
        model={"backbone": "resnet18", "freeze_stages": 3},
        data={"augment": "light"},
        train={"epochs": 6, "frozen_cache_views": 3},
    )
    run, _ = engine.fit(cfg, runs_root=tmp_path)

    # every training batch was cached layer3 outputs (256 channels, a crop of the 2x2 map of 32x32
    # images), and the frozen stem never ran in a training step (it ran to build the cache)
    assert spy.batches and {(dtype, shape[1]) for dtype, shape, _ in spy.batches} == {(torch.float16, 256)}
    assert spy.calls_in_steps == 0 and spy.calls > 0
    rows = engine.read_history(run.history)
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses

    m = evaluate_run(run.path)  # the checkpoint evaluates through the usual path, on images
    assert m["classification"]["top1"] >= 0.5, m["classification"]  # 4 classes: chance is 25%
    state = torch.load(run.best_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert {k.removeprefix("model.") for k in state} == set(start)  # a full model, nothing else
    frozen = ("backbone.conv1.", "backbone.bn1.", "backbone.layer1.", "backbone.layer2.", "backbone.layer3.")
    for k, v in start.items():
        if k.startswith(frozen):
            assert torch.equal(state[f"model.{k}"], v), k  # bit-identical, BatchNorm statistics too
    assert not torch.equal(state["model.backbone.layer4.0.conv1.weight"], start["backbone.layer4.0.conv1.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("mixing", [{"cutmix": 1.0}, {"mixup": 0.4}])
def test_mixup_and_cutmix_mix_the_cached_maps(tmp_path, spy, monkeypatch, mixing):
    mixed = []
    make_task = engine.make_task  # the spy's

    def hooked_make_task(*args, **kwargs):
        task = make_task(*args, **kwargs)
        task.mixer.register_forward_hook(lambda _, inputs, outputs: mixed.append((*inputs, *outputs)))
        return task

    monkeypatch.setattr(engine, "make_task", hooked_make_task)
    spy, _ = spy
    cfg = tiny_config(
        tmp_path,
        model={"backbone": "resnet18", "freeze_stages": 2},
        data={"image_size": [64, 64]},
        train={"epochs": 2, "frozen_cache_views": 2, **mixing},
    )
    engine.fit(cfg, runs_root=tmp_path)
    assert mixed and len(mixed) == len(spy.batches) and spy.calls_in_steps == 0
    for x, y, xm, target in mixed:
        assert x.dtype == torch.float32 and x.shape[1] == 128  # the cached layer2 maps, not images
        assert xm.shape == x.shape
        assert target.shape == (len(y), 4) and torch.allclose(target.sum(1), torch.ones(len(y)))
    # mixed with another image of the batch, with soft targets (each class's share)
    assert any(not torch.equal(xm, x) and (target.max(1).values < 1).any() for x, _, xm, target in mixed)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_schedules_that_count_steps_before_fit_starts_train_on_the_cache(tmp_path, schedule):
    """The shipped cpu45 recipes (onecycle, cosine) ask for the training loader in configure_optimizers,
    before on_fit_start: the cache is built then, once."""
    from finegrain.tasks import base

    builds = []
    real = base.build_frozen_views

    def counting(*args, **kwargs):
        builds.append(1)
        return real(*args, **kwargs)

    cfg = tiny_config(
        tmp_path,
        model={"backbone": "resnet18", "freeze_stages": 2},
        schedule={"name": schedule, "warmup_epochs": 1},
        train={"epochs": 2, "frozen_cache_views": 2},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base, "build_frozen_views", counting)  # where the task calls it
        run, _ = engine.fit(cfg, runs_root=tmp_path)
    assert builds == [1]
    assert len(engine.read_history(run.history)) == 2


# ---------------------------------------------------------------------- (c) the views and their draw
def _prefix(model):
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.frozen_prefix(model.normalise_input(x))

    return run


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Read only (a test may set the data module's frozen_views): built once for the module."""
    cfg = tiny_config(
        tmp_path_factory.mktemp("cached"),
        model={"backbone": "resnet18", "freeze_stages": 2},
        data={"augment": "light", "image_size": [64, 64]},
        train={"frozen_cache_views": 3},
    )
    dm = FinegrainDataModule(cfg)
    torch.manual_seed(0)
    model = build_from_config(cfg, len(dm.class_names)).eval()
    return cfg, dm, model, build_frozen_views(dm.train_records, cfg.data, _prefix(model), 3, seed=0)


@pytest.mark.slow
def test_views_are_the_image_its_mirror_and_seeded_augmentations(cached):
    cfg, dm, model, views = cached
    n = len(dm.train_records)
    assert views.features.shape == (n, 3, 128, 8, 8) and views.features.dtype == np.float16
    assert views.indices.tolist() == list(range(n)) and views.labels.tolist() == [r.label for r in dm.train_records]
    x = torch.cat([b[0] for b in make_loader(dm.train_records, cfg.data, False, size=(64, 64))])
    prefix = _prefix(model)
    plain, mirror = prefix(x).half().numpy(), prefix(torch.flip(x, dims=[3])).half().numpy()
    np.testing.assert_allclose(views.features[:, 0], plain, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(views.features[:, 1], mirror, atol=1e-3, rtol=1e-3)
    assert not np.allclose(mirror, plain, atol=1e-2)
    augmented = views.features[:, 2].astype(np.float32)
    assert np.mean([not np.allclose(a, p, atol=1e-2) for a, p in zip(augmented, plain, strict=True)]) > 0.8

    again = build_frozen_views(dm.train_records, cfg.data, prefix, 3, seed=0)
    other = build_frozen_views(dm.train_records, cfg.data, prefix, 3, seed=1)
    assert np.array_equal(again.features, views.features)
    assert np.array_equal(other.features[:, :2], views.features[:, :2])
    assert not np.allclose(other.features[:, 2], views.features[:, 2], atol=1e-2)


def test_unreadable_images_are_left_out_of_the_cache(cached, tmp_path):
    cfg, dm, model, _ = cached
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    records = [*dm.train_records[:3], ImageRecord(bad, 0), *dm.train_records[3:6]]
    views = build_frozen_views(records, cfg.data, _prefix(model), 2, seed=0)
    assert views.features.shape[:2] == (6, 2) and views.indices.tolist() == [0, 1, 2, 4, 5, 6]


def test_the_view_drawn_depends_on_seed_and_epoch_only(cached):
    *_, views = cached
    a, b = FrozenViewDataset(views, seed=7), FrozenViewDataset(views, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)  # another instance (a resumed run) at the same epoch
    assert np.array_equal(a.view_of, b.view_of) and set(a.view_of.tolist()) == {0, 1, 2}
    batch = list(range(0, 40, 3))
    for xa, xb in zip(a.__getitems__(batch), b.__getitems__(batch), strict=True):
        assert torch.equal(xa, xb)
    b.set_epoch(4)
    assert not np.array_equal(a.view_of, b.view_of)
    c = FrozenViewDataset(views, seed=8)
    c.set_epoch(3)
    assert not np.array_equal(a.view_of, c.view_of)

    # without the crop a batch is exactly the drawn views
    whole = FrozenViewDataset(views, seed=7, min_keep=1.0)
    whole.set_epoch(3)
    x, y, idx = whole.__getitems__(batch)
    assert torch.equal(x, torch.from_numpy(views.features[batch, a.view_of[batch]]))
    assert y.tolist() == views.labels[batch].tolist() and idx.tolist() == batch


def test_batches_are_cropped_to_75_to_100_percent_of_the_map(cached):
    *_, views = cached
    ds = FrozenViewDataset(views, seed=0)
    sizes = set()
    for start in range(0, 60, 6):
        x, _, idx = ds.__getitems__(list(range(start, start + 6)))
        kh, kw = x.shape[2:]
        assert math.ceil(0.75 * 8) <= min(kh, kw) and max(kh, kw) <= 8
        sizes.add((kh, kw))
        for crop, i in zip(x, idx.tolist(), strict=True):  # each a window of its image's drawn view
            full = torch.from_numpy(views.features[i, ds.view_of[i]])
            assert any(
                torch.equal(crop, full[:, t : t + kh, s : s + kw]) for t in range(8 - kh + 1) for s in range(8 - kw + 1)
            )
    assert len(sizes) > 1


def test_the_training_loader_keeps_the_sampler_and_passes_the_epoch_on(cached):
    _, dm, _, views = cached
    dm.frozen_views = views
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)  # what Lightning calls at the start of every epoch
    assert loader.sampler.sampler.epoch == 2 and loader.dataset.epoch == 2
    order = [i for _, _, idx in loader for i in idx.tolist()]
    shuffle = torch.utils.data.DistributedSampler(range(len(views)), num_replicas=1, rank=0, shuffle=True, seed=0)
    shuffle.set_epoch(2)
    assert order == list(shuffle)  # the same seeded shuffle as the image loader's
    x, y, idx = next(iter(loader))
    assert x.dtype == torch.float16 and y.tolist() == [dm.train_records[i].label for i in idx.tolist()]


# ---------------------------------------------------------------------- (d) metric learning
@pytest.mark.slow
@pytest.mark.parametrize("loss", ["multi_similarity", "proxy_anchor"])  # a pair loss, and one with learned proxies
def test_metric_learning_with_class_balanced_batches_trains_on_the_cache(tmp_path, spy, loss):
    spy, _ = spy
    cfg = tiny_metric_config(
        tmp_path,
        name="ml",
        data={"augment": "light"},
        model={"backbone": "resnet18", "freeze_stages": 2},
        loss={"name": loss},
        train={"epochs": 2, "frozen_cache_views": 2},
    )
    run, _ = engine.fit(cfg, runs_root=tmp_path)
    assert spy.batches and spy.calls_in_steps == 0
    for dtype, shape, labels in spy.batches:
        assert dtype == torch.float16 and shape[1] == 128
        assert sorted(labels.count(c) for c in set(labels)) == [4, 4], labels  # m images of each class
    r = evaluate_run(run.path)["retrieval"]
    assert 0.0 <= r["recall@1"] <= r["recall@8"] <= 1.0


# ---------------------------------------------------------------------- (e) what the config refuses
@pytest.mark.parametrize(
    "model, train, keys",
    [
        ({}, {}, ("train.frozen_cache_views", "model.freeze_stages")),
        ({"freeze_stages": 2}, {"head_epochs": 1}, ("train.frozen_cache_views", "train.head_epochs")),
    ],
)
def test_the_config_refuses_what_the_cache_cannot_do(model, train, keys):
    raw = {"name": "x", "model": {"backbone": "resnet18", **model}, "train": {"frozen_cache_views": 2, **train}}
    with pytest.raises(ConfigError) as e:
        build_config(raw)
    assert all(k in str(e.value) for k in keys), str(e.value)
    raw["train"]["frozen_cache_views"] = 0  # off: the same settings are fine
    build_config(raw)
    with pytest.raises(ConfigError, match="frozen_cache_views"):
        build_config({"name": "x", "train": {"frozen_cache_views": -1}})
