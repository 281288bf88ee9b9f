"""Freeze policies (``model.freeze``) for a model with a ``backbone`` attribute.

- ``none``: every parameter trainable (nothing is changed);
- ``backbone``: the backbone's parameters get ``requires_grad=False`` and the
  backbone stays in eval mode, so its BatchNorm running statistics and dropout
  behave as at inference (the seed's "frozen ResNet-50" rows). Only the heads
  (classifier/embedder) train;
- ``bn``: the backbone's BatchNorm layers are frozen: their affine parameters get
  ``requires_grad=False`` and the layers stay in eval mode, so their running
  statistics are neither updated nor replaced by batch statistics (useful with
  small batches). The rest of the backbone trains.

Independently, ``model.freeze_stages: N`` freezes the backbone's stem and its first
``N`` stages (weights and BatchNorm statistics, kept in eval mode): partial
fine-tuning. The early layers of an ImageNet network change least when fine-tuned
and cost most at high resolution; freezing them skips their backward pass
(EfficientNet-Lite0 at 144x192 trains 1.36x faster with the stem and two stages
frozen). Stages are timm EfficientNets' ``blocks`` and torchvision ResNets'
``layer1``-``layer4``. :func:`early_forward` and :func:`late_forward` split the
backbone's forward pass after the frozen stages (together they equal it), so the
frozen part's outputs can be computed once and trained on (``train.frozen_cache_views``).

How "stays in eval mode" is done: a :class:`~finegrain.models.model.FinegrainModel`
records the policy in ``model.freeze_policy`` and its ``train()`` override puts
the backbone (``backbone``) or its BatchNorm layers (``bn``) back into eval mode
after every ``model.train()`` — Lightning calls ``train()`` at the start of every
training epoch, and ``nn.Module.train`` reaches the model through its parent's
recursion, so the override always runs. Any other module gets a forward
pre-hook on its backbone doing the same before every forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from finegrain.errors import ConfigError, unknown_name

FREEZE_POLICIES: tuple[str, ...] = ("none", "backbone", "bn")


def _bn_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _eval_hook(policy: str):
    def hook(module: nn.Module, _inputs) -> None:
        if policy == "backbone":
            if module.training:
                module.eval()
        else:
            for m in _bn_layers(module):
                if m.training:
                    m.eval()

    return hook


Tail = Callable[[torch.Tensor], torch.Tensor]


def _layout(backbone: nn.Module) -> tuple[list[nn.Module], list[nn.Module], Tail | None]:
    """(stem modules in forward order, stages, the tail from the last stage's output to the pooled,
    flattened features, or None where the forward pass is not known well enough to be split)."""
    b: Any = backbone  # duck-typed: the attributes tested with hasattr below
    if hasattr(b, "conv_stem") and hasattr(b, "blocks"):  # timm EfficientNet / MobileNet
        # optional: timm (the train extra), imported only when this runs
        from timm.models.efficientnet import EfficientNet
        from timm.models.mobilenetv3 import MobileNetV3

        tail: Tail | None = None
        if isinstance(b, EfficientNet):  # the head convolution is part of its forward_features

            def tail(x: torch.Tensor) -> torch.Tensor:
                return b.forward_head(b.bn2(b.conv_head(x)))

        elif isinstance(b, MobileNetV3):  # its forward_head holds the head convolution
            tail = b.forward_head
        return [b.conv_stem, b.bn1], list(b.blocks), tail
    if all(hasattr(b, f"layer{i}") for i in range(1, 5)):
        stages = [getattr(b, f"layer{i}") for i in range(1, 5)]
        if hasattr(b, "act1") and hasattr(b, "forward_head"):  # timm ResNet (timm:resnet*)
            return [b.conv1, b.bn1, b.act1, b.maxpool], stages, b.forward_head
        # torchvision ResNet: its stem ends with relu and maxpool; fc is Identity (backbones._strip_head)
        return [b.conv1, b.bn1, b.relu, b.maxpool], stages, lambda x: b.fc(torch.flatten(b.avgpool(x), 1))
    raise ConfigError(
        f"model.freeze_stages: {type(b).__name__} has no known stages "
        "(supported: timm EfficientNets, torchvision ResNets)"
    )


def early_modules(backbone: nn.Module, stages: int) -> list[nn.Module]:
    """The stem and the first ``stages`` stages of ``backbone``, in forward order (none for 0)."""
    stem, all_stages, _ = _layout(backbone)
    if not 0 <= stages <= len(all_stages):
        raise ConfigError(
            f"model.freeze_stages must be between 0 and {len(all_stages)} for this backbone, got {stages}"
        )
    return stem + all_stages[:stages] if stages else []


def _split(backbone: nn.Module, stages: int) -> tuple[list[nn.Module], list[nn.Module], Tail]:
    """(the frozen prefix's modules, the later ones, the tail) of a backbone whose forward pass is known."""
    stem, all_stages, tail = _layout(backbone)
    early = early_modules(backbone, stages)
    if tail is None:
        raise ConfigError(
            f"train.frozen_cache_views: cannot split {type(backbone).__name__}'s forward pass after "
            "its frozen stages (supported: timm EfficientNets and MobileNetV3s, torchvision and "
            "timm ResNets)"
        )
    return early, ([] if stages else stem) + all_stages[stages:], tail


def early_forward(backbone: nn.Module, stages: int, x: torch.Tensor) -> torch.Tensor:
    """The output of the stem and first ``stages`` stages for normalised images ``x`` (``x`` itself for 0)."""
    for m in _split(backbone, stages)[0]:
        x = m(x)
    return x


def late_forward(backbone: nn.Module, stages: int, f: torch.Tensor) -> torch.Tensor:
    """The rest of ``backbone`` from :func:`early_forward`'s output ``f``: the later stages, the
    tail and global pooling, to ``[B, out_features]``; ``late_forward(b, s, early_forward(b, s, x))``
    is ``b(x)`` flattened. The pooling takes any map size (a cropped ``f`` too)."""
    _, late, tail = _split(backbone, stages)
    for m in late:
        f = m(f)
    out = tail(f)
    return out.flatten(1) if out.dim() > 2 else out


def apply_freeze(model: nn.Module, policy: str, stages: int = 0) -> nn.Module:
    """Apply freeze ``policy`` (one of :data:`FREEZE_POLICIES`) to ``model.backbone``, and freeze its
    stem and first ``stages`` stages; returns ``model``."""
    if policy not in FREEZE_POLICIES:
        raise ConfigError(str(unknown_name("freeze policy (model.freeze)", str(policy), FREEZE_POLICIES)))
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ConfigError(f"cannot apply freeze policy '{policy}': the model has no backbone")
    early = early_modules(backbone, stages) if stages else []
    target: Any = model  # a FinegrainModel's attributes, tested with hasattr (model.py imports this module)
    if early:
        if not hasattr(model, "frozen_parts"):
            raise ConfigError("model.freeze_stages needs a finegrain model")
        for p in (p for m in early for p in m.parameters()):
            p.requires_grad_(False)
        target.frozen_parts = early
        target.frozen_stages = stages
        model.train(model.training)
    if policy == "none":
        return model
    if policy == "backbone":
        for p in backbone.parameters():
            p.requires_grad_(False)
    else:
        for m in _bn_layers(backbone):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)

    if hasattr(model, "freeze_policy"):
        target.freeze_policy = policy
        model.train(model.training)  # re-apply the current mode through the override
    else:
        backbone.register_forward_pre_hook(_eval_hook(policy))
        _eval_hook(policy)(backbone, ())
    return model
