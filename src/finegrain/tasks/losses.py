"""Metric-learning losses: one registered builder per loss name, each reading its own typed
settings (``finegrain.config.LOSS_CONFIGS``), built on pytorch-metric-learning."""

from __future__ import annotations

from collections.abc import Callable

import torch

from finegrain.faiss_import import import_faiss

import_faiss()  # before pytorch-metric-learning loads faiss with a slow BLAS kernel choice
from pytorch_metric_learning import losses, miners  # noqa: E402

from finegrain import config as C  # noqa: E402
from finegrain.errors import ConfigError  # noqa: E402
from finegrain.registry import Registry  # noqa: E402

Built = tuple[torch.nn.Module, torch.nn.Module | None]
"""(loss, miner or None)"""
LOSSES: Registry[Callable[..., Built]] = Registry("metric-learning loss")


class CrossBatchMemory(losses.CrossBatchMemory):
    """pytorch-metric-learning's cross-batch memory, its memory left out of the state dict: pml does
    not save where the queue stands, so a restored memory would be ignored until overwritten anyway,
    and checkpoints stay the size (and keys) of a run without one."""

    def reset_queue(self) -> None:
        super().reset_queue()
        for name in ("embedding_memory", "label_memory"):
            self.register_buffer(name, getattr(self, name), persistent=False)


@LOSSES.register("multi_similarity")
def _multi_similarity(cfg: C.MultiSimilarityLoss, num_classes: int, dim: int) -> Built:
    loss = losses.MultiSimilarityLoss(alpha=cfg.alpha, beta=cfg.beta, base=cfg.base)
    miner = miners.MultiSimilarityMiner(epsilon=cfg.miner_epsilon)
    if cfg.xbm_size:  # the memory mines the batch's pairs itself, against the batch and the memory
        return CrossBatchMemory(loss, dim, memory_size=cfg.xbm_size, miner=miner), None
    return loss, miner


@LOSSES.register("contrastive")
def _contrastive(cfg: C.ContrastiveLoss, num_classes: int, dim: int) -> Built:
    return losses.ContrastiveLoss(pos_margin=cfg.pos_margin, neg_margin=cfg.neg_margin), None


@LOSSES.register("triplet")
def _triplet(cfg: C.TripletLoss, num_classes: int, dim: int) -> Built:
    return (
        losses.TripletMarginLoss(margin=cfg.margin),
        miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets="semihard"),
    )


@LOSSES.register("proxy_anchor")
def _proxy_anchor(cfg: C.ProxyAnchorLoss, num_classes: int, dim: int) -> Built:
    return losses.ProxyAnchorLoss(num_classes, dim, margin=cfg.margin, alpha=cfg.alpha), None


@LOSSES.register("normalized_softmax")
def _normalized_softmax(cfg: C.NormalizedSoftmaxLoss, num_classes: int, dim: int) -> Built:
    return losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=cfg.temperature), None


@LOSSES.register("arcface")
def _arcface(cfg: C.ArcFaceLoss, num_classes: int, dim: int) -> Built:
    return losses.ArcFaceLoss(num_classes, dim, margin=cfg.margin, scale=cfg.scale), None


def build_loss(cfg, num_classes: int, dim: int) -> Built:
    """(loss, miner) of a metric-learning config's ``loss`` section."""
    if cfg.name == "cross_entropy":
        raise ConfigError(
            "task metric_learning needs a metric-learning loss (config key 'loss.name'); "
            f"valid: {', '.join(LOSSES.names())}"
        )
    return LOSSES.get(cfg.name)(cfg, num_classes, dim)
