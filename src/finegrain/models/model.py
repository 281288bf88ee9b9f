"""The model every task trains: a backbone, an optional classifier, an optional embedder.

``FinegrainModel.forward(x)`` returns a dict:

- ``features``: the backbone's pooled features ``[B, feature_dim]`` (always);
- ``logits``: ``[B, num_classes]`` when the model has a classifier;
- ``embedding``: ``[B, embedding_dim]`` when the model has an embedder
  (L2-normalised when ``normalize_embedding``).

With ``frozen=True`` (``forward``, ``features``, ``logits``, ``embed``) the input is the output of
:meth:`FinegrainModel.frozen_prefix` (the frozen stem and stages of ``model.freeze_stages``) rather
than images: training on cached frozen-stage outputs (``train.frozen_cache_views``) runs only the rest.

Heads (``head``):

- ``classifier``: ``Dropout(p) -> Linear(feature_dim, num_classes)`` on the features;
- ``cosine``: ``Dropout(p) ->`` :class:`CosineLinear` on the features: each logit is the cosine
  similarity of the features to a learned class vector over a temperature of 0.05 (a cosine
  classifier; the normalized softmax of Zhai & Wu 2018 with a class's vector as its proxy);
- ``embedding``: ``Linear(feature_dim, embedding_dim)`` (``-> BatchNorm1d`` with
  ``bn_neck``), then L2 normalisation when ``normalize_embedding``;
- ``both``: the embedder, plus a classifier ``Dropout(p) -> Linear(embedding_dim,
  num_classes)`` that sits on the embedding BEFORE its L2 normalisation (after the
  BN neck when there is one), as in the BNNeck of Luo et al. 2019: the
  cross-entropy sees the unnormalised vector, the metric loss the normalised one.

``cubs`` inserts a :class:`~finegrain.models.cubs.CUBSBlock` at the end of each
residual stage ``layerN`` (``N`` in ``cubs_stages``) of a torchvision ResNet; the
block is appended to the stage's ``nn.Sequential`` as ``layerN.cubs`` so the
stage's own parameter names (and ImageNet weights) are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.errors import ConfigError, unknown_name
from finegrain.models.backbones import (
    WEIGHT_CHOICES,
    _check_weights,
    build_backbone,
    load_local_weights,
    set_drop_path,
    set_global_pool,
)
from finegrain.models.cubs import VARIANTS, CUBSBlock
from finegrain.models.freezing import early_forward, late_forward
from finegrain.registry import Registry

CUBS_CHOICES: tuple[str, ...] = ("none", *VARIANTS)


class Embedder(nn.Module):
    """``Linear(in, dim)`` (+ ``BatchNorm1d`` as a BN neck); normalisation is the model's."""

    def __init__(self, in_features: int, dim: int, bn_neck: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, dim)
        self.bn = nn.BatchNorm1d(dim) if bn_neck else None
        if self.bn is not None:
            self.bn.bias.requires_grad_(False)  # BNNeck: no shift, keeps the vectors centred

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        return self.bn(x) if self.bn is not None else x


class CosineLinear(nn.Linear):
    """A cosine classifier: ``cos(x, w_c) / temperature`` for each class vector ``w_c`` (no bias).
    Being an ``nn.Linear``, it names its number of classes as a linear layer does."""

    def __init__(self, in_features: int, num_classes: int, temperature: float = 0.05) -> None:
        super().__init__(in_features, num_classes, bias=False)
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1)) / self.temperature


class FinegrainModel(nn.Module):
    """Backbone + optional classifier + optional embedder (see the module docstring)."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        classifier: nn.Module | None = None,
        embedder: nn.Module | None = None,
        normalize_embedding: bool = True,
        classifier_on_embedding: bool = False,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        if classifier_on_embedding and embedder is None:
            raise ConfigError("a classifier on the embedding needs an embedder")
        self.backbone = backbone
        self.classifier = classifier
        self.embedder = embedder
        self.feature_dim = int(feature_dim)
        self.normalize_embedding = bool(normalize_embedding)
        self.classifier_on_embedding = bool(classifier_on_embedding)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        # set by finegrain.models.freezing.apply_freeze; honoured by train()
        self.freeze_policy = "none"
        self.frozen_parts: list[nn.Module] = []  # model.freeze_stages: kept in eval mode too
        self.frozen_stages = 0  # model.freeze_stages, set by apply_freeze

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> FinegrainModel:
        """As ``nn.Module.train``, but a frozen backbone (or its BatchNorm layers) stays in eval mode."""
        super().train(mode)
        if mode and self.freeze_policy == "backbone":
            self.backbone.eval()
        elif mode and self.freeze_policy == "bn":
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if mode:
            for m in self.frozen_parts:
                m.eval()
        return self

    # ------------------------------------------------------------------ parts
    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (what the loaders give) to float, scaled to [0, 1] and normalised with the
        backbone's ``mean``/``std``, on their own device; float images are taken as normalised already."""
        if x.dtype != torch.uint8:
            return x
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1) * 255
        inv_std = 1 / (torch.tensor(self.std, device=x.device).view(1, -1, 1, 1) * 255)
        return x.float().sub_(mean).mul_(inv_std)  # in place: one float copy of the batch

    def frozen_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The output of the frozen stem and stages (``model.freeze_stages``) for normalised images."""
        return early_forward(self.backbone, self.frozen_stages, x)

    def features_from_frozen(self, f: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, feature_dim]`` from :meth:`frozen_prefix`'s output (or a crop of it)."""
        return late_forward(self.backbone, self.frozen_stages, f)

    def features(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Pooled backbone features ``[B, feature_dim]`` of uint8 or normalised float images or, with
        ``frozen``, of :meth:`frozen_prefix` outputs (every head method takes ``frozen`` too)."""
        if frozen:
            return self.features_from_frozen(x)
        f = self.backbone(self.normalise_input(x))
        return f.flatten(1) if f.dim() > 2 else f

    def _raw_embedding(self, f: torch.Tensor) -> torch.Tensor:
        if self.embedder is None:
            raise ConfigError("this model has no embedder (head: classifier)")
        return self.embedder(f)

    def _normalise(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(e, dim=1) if self.normalize_embedding else e

    def _logits_from(self, f: torch.Tensor, raw_emb: torch.Tensor | None) -> torch.Tensor:
        if self.classifier is None:
            raise ConfigError("this model has no classifier (head: embedding); use embed() or features()")
        return self.classifier(raw_emb if self.classifier_on_embedding and raw_emb is not None else f)

    def logits(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Class scores ``[B, num_classes]``; an error when the model has no classifier."""
        if self.classifier is None:
            raise ConfigError("this model has no classifier (head: embedding); use embed() or features()")
        f = self.features(x, frozen)
        raw = self._raw_embedding(f) if self.classifier_on_embedding else None
        return self._logits_from(f, raw)

    def embed(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """The embedding when the model has an embedder, else the features."""
        f = self.features(x, frozen)
        if self.embedder is None:
            return f
        return self._normalise(self._raw_embedding(f))

    def forward(self, x: torch.Tensor, frozen: bool = False) -> dict[str, torch.Tensor]:
        f = self.features(x, frozen)
        out: dict[str, torch.Tensor] = {"features": f}
        raw = self._raw_embedding(f) if self.embedder is not None else None
        if raw is not None:
            out["embedding"] = self._normalise(raw)
        if self.classifier is not None:
            out["logits"] = self._logits_from(f, raw)
        return out

    @property
    def num_classes(self) -> int | None:
        if self.classifier is None:
            return None
        linears = [m for m in self.classifier.modules() if isinstance(m, nn.Linear)]
        return linears[-1].out_features if linears else None


# ---------------------------------------------------------------------- CUBS
def stage_channels(stage: nn.Module) -> int:
    """Output channels of a ResNet stage: the last BatchNorm of its last block."""
    bns = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise ConfigError("cannot tell the channels of this ResNet stage (no BatchNorm2d)")
    return bns[-1].num_features


def insert_cubs(backbone: nn.Module, variant: str, stages, backbone_name: str = "") -> list[int]:
    """Append a CUBSBlock(variant) to ``layerN`` for N in ``stages``; return the stages."""
    # optional: torchvision (the train extra), imported only when this runs
    import torchvision

    if not isinstance(backbone, torchvision.models.ResNet):
        raise ConfigError(
            f"model.cubs: {variant} needs a torchvision ResNet backbone (resnet18, resnet50, ...), "
            f"not '{backbone_name or type(backbone).__name__}'"
        )
    stages = sorted({int(s) for s in stages})
    if not stages:
        raise ConfigError("model.cubs_stages is empty: name the residual stages (1-4) to put CUBS blocks after")
    bad = [s for s in stages if s not in (1, 2, 3, 4)]
    if bad:
        raise ConfigError(f"model.cubs_stages: {bad} not residual stages; valid: 1, 2, 3, 4")
    for s in stages:
        layer = getattr(backbone, f"layer{s}")
        if not isinstance(layer, nn.Sequential) or "cubs" in layer._modules:
            raise ConfigError(f"layer{s} of the backbone already has a CUBS block or is not a Sequential")
        layer.add_module("cubs", CUBSBlock(stage_channels(layer), variant))
    return stages


# ---------------------------------------------------------------------- heads
HeadParts = tuple[Embedder | None, nn.Module | None]
"""(embedder, classifier) of a head; a classifier beside an embedder sits on the embedding."""
HEADS: Registry[Callable[[int, int | None, int, float, bool], HeadParts]] = Registry("head")


def _classifier(in_dim: int, num_classes: int | None, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, int(num_classes or 0)))


@HEADS.register("classifier")
def _classifier_head(feature_dim: int, num_classes: int | None, dim: int, dropout: float, bn_neck: bool) -> HeadParts:
    return None, _classifier(feature_dim, num_classes, dropout)


@HEADS.register("cosine")
def _cosine_head(feature_dim: int, num_classes: int | None, dim: int, dropout: float, bn_neck: bool) -> HeadParts:
    return None, nn.Sequential(nn.Dropout(dropout), CosineLinear(feature_dim, int(num_classes or 0)))


@HEADS.register("embedding")
def _embedding_head(feature_dim: int, num_classes: int | None, dim: int, dropout: float, bn_neck: bool) -> HeadParts:
    return Embedder(feature_dim, dim, bn_neck), None


@HEADS.register("both")
def _both_heads(feature_dim: int, num_classes: int | None, dim: int, dropout: float, bn_neck: bool) -> HeadParts:
    return Embedder(feature_dim, dim, bn_neck), _classifier(dim, num_classes, dropout)


# ---------------------------------------------------------------------- factory
def build_model(
    backbone: str,
    weights: str = "none",
    num_classes: int | None = None,
    head: str = "classifier",
    dropout: float = 0.0,
    embedding_dim: int = 512,
    normalize_embedding: bool = True,
    bn_neck: bool = False,
    stem: str = "stock",
    cubs: str = "none",
    cubs_stages=(3, 4),
    drop_path: float = 0.0,
    global_pool: str = "avg",
) -> FinegrainModel:
    """A :class:`FinegrainModel` from the ``model`` section of a config."""
    make_head = HEADS.get(head)
    if cubs not in CUBS_CHOICES:
        raise ConfigError(str(unknown_name("CUBS variant (model.cubs)", cubs, CUBS_CHOICES)))
    if head in ("classifier", "cosine", "both") and (num_classes is None or int(num_classes) < 1):
        raise ConfigError(f"head: {head} needs num_classes (a positive number of classes), got {num_classes!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    if head in ("embedding", "both") and int(embedding_dim) < 1:
        raise ConfigError(f"embedding_dim must be positive, got {embedding_dim}")

    w = str(weights)
    local = w.strip().lower() not in WEIGHT_CHOICES
    if cubs != "none" and local:
        # the file may hold the CUBS blocks too: insert them first, then load
        body, feature_dim, mean, std = build_backbone(backbone, "none", stem=stem)
        insert_cubs(body, cubs, cubs_stages, backbone)
        load_local_weights(body, _check_weights(w))
    else:
        body, feature_dim, mean, std = build_backbone(backbone, w, stem=stem)
        if cubs != "none":
            insert_cubs(body, cubs, cubs_stages, backbone)

    if drop_path > 0:
        set_drop_path(body, float(drop_path), backbone)
    if global_pool != "avg":
        set_global_pool(body, global_pool, backbone)
    embedder, classifier = make_head(feature_dim, num_classes, int(embedding_dim), float(dropout), bn_neck)
    return FinegrainModel(
        body,
        feature_dim,
        classifier=classifier,
        embedder=embedder,
        normalize_embedding=normalize_embedding,
        classifier_on_embedding=embedder is not None and classifier is not None,
        mean=mean,
        std=std,
    )
