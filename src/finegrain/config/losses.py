"""The losses' settings: one typed model per loss, chosen by ``loss.name``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from finegrain.config.section import Section
from finegrain.errors import ConfigError, did_you_mean


class CrossEntropyLoss(Section):
    """Classification: cross-entropy over the classifier's logits."""

    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class MultiSimilarityLoss(Section):
    """Wang et al. 2019 with its pair miner (pytorch-metric-learning names)."""

    name: Literal["multi_similarity"]
    alpha: float = 2.0
    beta: float = 50.0
    base: float = 0.5
    """The similarity offset (lambda in the paper)."""
    miner_epsilon: float = 0.1
    xbm_size: int = Field(0, ge=0)
    """A cross-batch memory (XBM, Wang et al. 2020) of this many past embeddings, which each batch's
    pairs are also mined against and weighed with; at least one training batch (``data.batch_size`` x
    devices). Not checkpointed: a resumed run starts with an empty memory, full again after
    xbm_size / data.batch_size steps (a resumed run is not the unbroken one). 0 (default): off."""


class ContrastiveLoss(Section):
    """Hadsell et al. 2006 over Euclidean distances of the embeddings."""

    name: Literal["contrastive"]
    pos_margin: float = Field(0.0, ge=0)
    neg_margin: float = Field(1.0, ge=0)


class TripletLoss(Section):
    """Triplet margin loss with semi-hard triplet mining."""

    name: Literal["triplet"]
    margin: float = Field(0.1, ge=0)


class ProxyLoss(Section):
    """A loss with one learned proxy per class, trained at its own learning rate."""

    proxy_lr_mult: float = Field(100.0, gt=0)
    """The proxies' learning rate relative to the head's."""


class ProxyAnchorLoss(ProxyLoss):
    """Kim et al. 2020: one learned proxy per class."""

    name: Literal["proxy_anchor"]
    margin: float = 0.1
    alpha: float = 32.0


class NormalizedSoftmaxLoss(ProxyLoss):
    """Zhai & Wu 2018: softmax over cosine similarities to class proxies."""

    name: Literal["normalized_softmax"]
    temperature: float = Field(0.05, gt=0)


class ArcFaceLoss(ProxyLoss):
    """Deng et al. 2019: an additive angular margin (in degrees) on class proxies."""

    name: Literal["arcface"]
    margin: float = Field(28.6, ge=0)
    scale: float = Field(64.0, gt=0)


LOSS_CONFIGS: dict[str, type[Section]] = {
    m.model_fields["name"].annotation.__args__[0]: m  # type: ignore[union-attr]
    for m in (
        CrossEntropyLoss,
        MultiSimilarityLoss,
        ContrastiveLoss,
        TripletLoss,
        ProxyAnchorLoss,
        NormalizedSoftmaxLoss,
        ArcFaceLoss,
    )
}
"""Every loss by name, each with only its own settings: no loss can silently ignore a key."""

LossConfig = Annotated[
    CrossEntropyLoss
    | MultiSimilarityLoss
    | ContrastiveLoss
    | TripletLoss
    | ProxyAnchorLoss
    | NormalizedSoftmaxLoss
    | ArcFaceLoss,
    Field(discriminator="name"),
]


def loss_model(name: Any) -> type[Section]:
    """The settings model of a loss name; an unknown name is an error with the valid ones."""
    if name not in LOSS_CONFIGS:
        hint = did_you_mean(str(name), LOSS_CONFIGS)
        raise ConfigError(f"unknown loss '{name}' (config key 'loss.name').{hint} Valid: {', '.join(LOSS_CONFIGS)}")
    return LOSS_CONFIGS[name]


def migrate_stored(raw: dict) -> dict:
    """A config stored by an older finegrain (in a run's config.yaml or checkpoint), made valid now:
    its ``loss`` section held every loss's settings; keep the named loss's own."""
    loss = raw.get("loss")
    if isinstance(loss, dict) and loss.get("name", "cross_entropy") in LOSS_CONFIGS:
        own = loss_model(loss.get("name", "cross_entropy")).model_fields
        raw = {**raw, "loss": {k: v for k, v in loss.items() if k in own}}
    return raw
