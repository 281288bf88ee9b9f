"""Every registered entry builds, and the config's names agree with the registries."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from finegrain import config as C
from finegrain.errors import ConfigError, FinegrainError
from finegrain.models.backbones import BACKBONES, LITE_VARIANTS, build_backbone
from finegrain.models.model import HEADS, build_model
from finegrain.retrieval.index import INDEX_KINDS, GalleryIndex
from finegrain.tasks.losses import LOSSES


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_named_backbone_builds_and_runs(name):
    module, out, mean, std = build_backbone(name, "none")
    x = torch.rand(2, 3, 64, 64)
    assert module.eval()(x).shape == (2, out) and len(mean) == len(std) == 3


@pytest.mark.slow
@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_every_efficientnet_lite_loads_its_offline_imagenet_weights(variant):
    from finegrain.models.backbones import lite_checkpoint_path

    module, *_ = build_backbone(f"efficientnet_lite{variant}", "imagenet")
    src = torch.load(lite_checkpoint_path(variant), map_location="cpu", weights_only=True)
    stem = next(v for k, v in src.items() if v.ndim == 4)  # the first convolution's weights
    assert torch.equal(module.conv_stem.weight, stem)
    random_init, *_ = build_backbone(f"efficientnet_lite{variant}", "none")
    assert not torch.equal(random_init.conv_stem.weight, stem)


def test_config_heads_are_the_registered_heads():
    literal = typing.get_args(C.ModelConfig.model_fields["head"].annotation)
    assert set(literal) == set(HEADS.names())


@pytest.mark.parametrize("head", HEADS.names())
def test_every_head_builds(head):
    model = build_model("cars_cnn4", num_classes=5, head=head, embedding_dim=8).eval()
    out = model(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    assert ("logits" in out) == (head != "embedding")
    assert ("embedding" in out) == C.ModelConfig(head=head).has_embedder  # what evaluation and reports go by


def test_config_losses_are_the_registered_losses():
    assert set(C.LOSS_CONFIGS) == set(LOSSES.names()) | {"cross_entropy"}


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_builds_from_its_own_settings_and_computes(name):
    from finegrain.tasks.losses import build_loss

    cfg = C.build_config({"name": "x", "task": "metric_learning", "loss": {"name": name}})
    loss, miner = build_loss(cfg.loss, num_classes=3, dim=8)
    emb = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    labels = torch.arange(12) % 3
    value = loss(emb, labels, miner(emb, labels)) if miner is not None else loss(emb, labels)
    assert torch.isfinite(value)


def test_a_key_of_another_loss_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"loss\.margin.*valid keys here: name, alpha, beta"):
        C.build_config({"name": "x", "loss": {"name": "multi_similarity", "margin": 0.3}})
    with pytest.raises(ConfigError, match="Did you mean 'proxy_anchor'"):
        C.build_config({"name": "x", "loss": {"name": "proxy_ancor"}})


def test_arcface_uses_its_margin():
    from finegrain.tasks.losses import build_loss

    cfg = C.build_config({"name": "x", "task": "metric_learning", "loss": {"name": "arcface", "margin": 10.0}})
    loss, _ = build_loss(cfg.loss, num_classes=3, dim=8)
    assert loss.margin == pytest.approx(np.radians(10.0))


def test_proxies_learn_at_their_own_rate_in_a_group_named_for_them():
    from finegrain.tasks.engine import make_task

    cfg = C.build_config(
        {
            "name": "x",
            "task": "metric_learning",
            "model": {"backbone": "cars_cnn4", "head": "embedding"},
            "optim": {"lr": 1e-3},
            "loss": {"name": "normalized_softmax", "proxy_lr_mult": 33},
        }
    )
    task = make_task(cfg, ["a", "b", "c"], [0, 1, 2])
    groups = {g["name"]: g for g in task.param_groups()}
    assert groups["proxies"]["lr"] == pytest.approx(0.033)
    assert [tuple(p.shape) for p in groups["proxies"]["params"]] == [(cfg.model.embedding_dim, 3)]


def test_another_loss_in_a_profile_replaces_the_old_losss_settings():
    raw = {
        "name": "x",
        "task": "metric_learning",
        "loss": {"name": "multi_similarity", "alpha": 5.0},
        "profiles": {"p": {"loss": {"name": "triplet"}}},
    }
    assert C.build_config(raw, profile="p").loss == C.TripletLoss(name="triplet")


def test_a_stored_config_of_an_older_finegrain_migrates():
    old = {
        "name": "x",
        "loss": {
            "name": "cross_entropy",
            "label_smoothing": 0.1,
            "alpha": 2.0,
            "margin": 0.1,
            "scale": 32.0,
            "proxy_lr_mult": 100.0,
        },
    }
    assert C.build_config(C.migrate_stored(old)).loss == C.CrossEntropyLoss(label_smoothing=0.1)


@pytest.mark.parametrize("kind", INDEX_KINDS.names())
def test_every_index_kind_builds_and_finds_a_vector_itself(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    index = GalleryIndex.build(
        x, np.arange(400) % 4, [f"{i}.jpg" for i in range(400)], kind=kind, model_checksum="0" * 64
    )
    _, ids = index.search(x[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_every_trained_task_is_registered():
    from finegrain.tasks.base import TASKS
    from finegrain.tasks.engine import make_task

    cfg = C.build_config({"name": "x", "model": {"backbone": "cars_cnn4"}})
    assert type(make_task(cfg, ["a", "b"], [0, 1])).__name__ == "ClassificationTask"
    assert set(TASKS.names()) == {"classification", "metric_learning"}
    knn = C.build_config({"name": "x", "task": "knn"})
    assert not knn.trains


# ---------------------------------------------------------------- finegrain list, model.backbone at load
def test_list_prints_each_registry_from_the_registry_itself():
    from typer.testing import CliRunner

    from finegrain.cli import app
    from finegrain.cli.registries import REGISTRIES, registry_names

    runner = CliRunner()
    for kind in REGISTRIES:
        r = runner.invoke(app, ["list", kind])
        assert r.exit_code == 0, r.output
        assert r.stdout.split() == registry_names(kind) and registry_names(kind)
    assert "arcface" in registry_names("losses") and "hnsw" in registry_names("index-kinds")
    assert {"embedded", "milvus"} <= set(registry_names("stores"))
    r = runner.invoke(app, ["list", "lossses"])  # main() turns this into one line and exit code 2
    assert isinstance(r.exception, FinegrainError) and "Did you mean 'losses'?" in str(r.exception)


def test_own_backbone_names_are_the_registered_ones():
    from finegrain.config.backbone_names import OWN_BACKBONES
    from finegrain.models.backbones import BACKBONES

    assert sorted(OWN_BACKBONES) == sorted(BACKBONES.names())


@pytest.mark.parametrize(
    ("name", "closest"),
    [("resnet5O", "resnet50"), ("efficientnet_lite9", "efficientnet_lite"), ("timm:resnet1800", "timm:resnet18")],
)
def test_an_unknown_backbone_fails_when_the_config_loads(name, closest):
    from finegrain.config import build_config

    with pytest.raises(ConfigError, match="model.backbone") as e:
        build_config({"model": {"backbone": name}})
    assert f"Did you mean '{closest}" in str(e.value) and "\n" not in str(e.value)
    assert build_config({"model": {"backbone": "timm:resnet18"}}).model.backbone == "timm:resnet18"
