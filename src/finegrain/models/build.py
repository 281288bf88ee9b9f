"""A config's model: the one place a run's architecture is built from its ``model`` section."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finegrain.config import ExperimentConfig

if TYPE_CHECKING:
    from finegrain.models.model import FinegrainModel


def build_from_config(cfg: ExperimentConfig, num_classes: int | None, weights: str | None = None) -> FinegrainModel:
    """The config's model (backbone + heads), with its freeze policy applied."""
    # optional: torch (the train extra), imported only when this runs
    from finegrain.models.freezing import apply_freeze
    from finegrain.models.model import build_model

    m = cfg.model
    model = build_model(
        backbone=m.backbone,
        weights=weights if weights is not None else m.weights,
        num_classes=num_classes,
        head=m.head,
        dropout=m.dropout,
        embedding_dim=m.embedding_dim,
        normalize_embedding=m.normalize_embedding,
        bn_neck=m.bn_neck,
        stem=m.stem,
        cubs=m.cubs,
        cubs_stages=list(m.cubs_stages),
        drop_path=m.drop_path,
        global_pool=m.global_pool,
    )
    apply_freeze(model, m.freeze, m.freeze_stages)
    return model


def num_outputs(cfg: ExperimentConfig, num_classes: int) -> int | None:
    """How many classes the model's classifier has: none for an embedding-only metric-learning model."""
    return None if cfg.model.head == "embedding" else num_classes
