"""The CUBS gates: shapes, gate ranges, gradients, cosine invariance, memory guard, ResNet variants."""

from __future__ import annotations

import warnings

import pytest
import torch

from finegrain.errors import ConfigError, FinegrainError
from finegrain.models.cubs import CUBS1, CUBS2, VARIANTS, CUBSBlock


def _x(b=2, c=16, h=5, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g)


@pytest.mark.parametrize("cls", [CUBS1, CUBS2])
def test_shape_and_gate_range(cls):
    torch.manual_seed(0)
    m = cls(16)
    x = _x()
    y = m(x)
    assert y.shape == x.shape
    gate = m.last_gate
    assert gate is not None and not gate.requires_grad
    assert gate.shape == ((2, 16) if cls is CUBS1 else (2, 1, 5, 4))
    assert torch.all(gate > 0) and torch.all(gate < 1)
    expected = x * (gate[:, :, None, None] if cls is CUBS1 else gate)
    assert torch.allclose(y, expected, atol=1e-6)


def test_defaults():
    assert CUBS1(256).hidden == 32 and CUBS1(256).d == 8
    assert CUBS1(16).hidden == 8
    assert CUBS2(512).d == 64 and CUBS2(16).d == 8
    t = CUBS1(16).temperature()
    assert t.item() == pytest.approx(10.0, rel=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(variant):
    torch.manual_seed(0)
    m = CUBSBlock(16, variant)
    x = _x().requires_grad_(True)
    (m(x) * torch.randn_like(x)).sum().backward()
    names = [n for n, _ in m.named_parameters()]
    assert any(n.startswith("cubs1.") for n in names) == (variant != "cubs2")
    assert any(n.startswith("cubs2.") for n in names) == (variant != "cubs1")
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_block_variants_compose_as_documented():
    torch.manual_seed(0)
    x = _x()
    s = CUBSBlock(16, "sum")
    assert torch.allclose(s(x), s.cubs1(x) + s.cubs2(x))
    a = CUBSBlock(16, "cubs1_then_cubs2")
    assert torch.allclose(a(x), a.cubs2(a.cubs1(x)))
    b = CUBSBlock(16, "cubs2_then_cubs1")
    assert torch.allclose(b(x), b.cubs1(b.cubs2(x)))
    assert CUBSBlock(16, "cubs1").cubs2 is None and CUBSBlock(16, "cubs2").cubs1 is None


@pytest.mark.parametrize("cls", [CUBS1, CUBS2])
@pytest.mark.parametrize("which", ["query", "key"])
def test_cosine_similarity_ignores_query_key_scale(cls, which):
    torch.manual_seed(0)
    m = cls(16)
    x = _x()
    before = m(x).clone()
    sim_before = m.similarity(x.mean((2, 3)) if cls is CUBS1 else x).clone()
    layer = getattr(m, which)
    with torch.no_grad():
        layer.weight.mul_(3.0)
        layer.bias.mul_(3.0)
    after = m(x)
    sim_after = m.similarity(x.mean((2, 3)) if cls is CUBS1 else x)
    assert torch.allclose(sim_before, sim_after, atol=1e-5)
    assert torch.allclose(before, after, atol=1e-6)
    # the similarity is a scaled cosine: bounded by the temperature
    assert sim_after.abs().max() <= m.temperature().item() + 1e-4


def test_softmax_is_column_wise():
    torch.manual_seed(0)
    m = CUBS2(8)
    x = _x(c=8)
    attn = m.similarity(x).softmax(dim=1)
    assert torch.allclose(attn.sum(dim=1), torch.ones(2, 20), atol=1e-5)


def test_cubs2_refuses_too_large_maps():
    m = CUBS2(8, max_bytes=10_000)
    x = torch.randn(2, 8, 8, 8)  # 2 * 64^2 * 4 = 32,768 bytes > 10 kB
    with pytest.raises(ConfigError) as e:
        m(x)
    msg = str(e.value)
    assert "8x8" in msg and "HW=64" in msg and "FINEGRAIN_CUBS2_MAX_BYTES" in msg
    assert "similarity matrix of 32.77 kB, over the limit of 10 kB" in msg
    assert isinstance(e.value, FinegrainError)


def test_cubs2_warns_above_a_quarter_of_the_limit():
    m = CUBS2(8, max_bytes=40_000)
    x = torch.randn(2, 8, 8, 8)  # 32,768 bytes: above 10,000, under 40,000
    with pytest.warns(UserWarning, match="CUBS2"):
        m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CUBS2(8, max_bytes=10**9)(x)  # far under the limit: silent


def test_cubs2_limit_from_environment(monkeypatch):
    monkeypatch.setenv("FINEGRAIN_CUBS2_MAX_BYTES", "1000")
    with pytest.raises(ConfigError, match="limit"):
        CUBS2(8)(torch.randn(1, 8, 4, 4))  # 1 * 16^2 * 4 = 1024 > 1000
    monkeypatch.setenv("FINEGRAIN_CUBS2_MAX_BYTES", "lots")
    with pytest.raises(ConfigError, match="FINEGRAIN_CUBS2_MAX_BYTES"):
        CUBS2(8)(torch.randn(1, 8, 4, 4))


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        CUBSBlock(16, "cubs3")
    for v in VARIANTS:
        assert v in str(e.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_inside_resnet18(variant):
    from finegrain.models.model import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=5, cubs=variant, cubs_stages=(3, 4))
    assert model.backbone.layer3.cubs.channels == 256
    assert model.backbone.layer4.cubs.channels == 512
    assert model.backbone.layer4.cubs.variant == variant
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out["logits"].shape == (2, 5) and out["features"].shape == (2, 512)
    out["logits"].sum().backward()
    block = model.backbone.layer3.cubs
    for gate in (block.cubs1, block.cubs2):
        if gate is not None:
            assert gate.last_gate is not None
            assert gate.query.weight.grad is not None
    if block.cubs2 is not None:
        assert block.cubs2.last_gate.shape == (2, 1, 2, 2)  # layer3 of a 32x32 input


def test_cubs_needs_a_resnet():
    from finegrain.models.model import build_model

    with pytest.raises(ConfigError, match="ResNet"):
        build_model("cars_cnn4", num_classes=3, cubs="cubs1")
    with pytest.raises(ConfigError, match="cubs_stages"):
        build_model("resnet18", num_classes=3, cubs="cubs1", cubs_stages=(5,))
    with pytest.raises(ConfigError, match="cubs1"):
        build_model("resnet18", num_classes=3, cubs="cubs_one")
