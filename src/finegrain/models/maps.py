"""Per-location head outputs of a :class:`~finegrain.models.model.FinegrainModel`: what the maps of
"why this answer" are made of (the numpy side is :mod:`finegrain.inference.explain`).

The backbone's features are the global average of its last feature map ``M`` ``[B, F, h, w]``.
Each location's feature vector ``m`` goes through the linear part of the heads, so that the mean
of a map over its locations is the model's own output:

- ``class_map`` ``[B, C, h, w]`` (models with a classifier): ``W m + b`` for the linear classifier
  (on the embedder's output ``A m + a`` for ``head: both``); for the cosine head
  ``(w_c / |w_c|) . m / (|f| T)`` with ``f`` the pooled features and ``T`` its temperature. Its
  mean over the locations is each class's logit: a class activation map (CAM, Zhou et al. 2016);
- ``embedding_map`` ``[B, D, h, w]``: the embedder's ``A m + a`` (a BN neck in eval mode is
  affine, so it is part of ``A``), divided by the norm of the pooled raw embedding when the
  embedding is normalised; the features ``m / |f|`` for a model without an embedder. Its mean
  over the locations is the model's embedding, so ``embedding_map . e_other`` summed... averaged
  over the locations is the cosine similarity to ``e_other``.

Exact for average pooling (every backbone's default). With ``model.global_pool: max`` or
``avgmax`` the maps use the same per-location projection but their mean is not the output: an
approximation. The map is read at the input of the backbone's global pooling module (timm's
``global_pool``, torchvision's ``avgpool``); backbones whose layers after that pooling are not
the identity (the seeds' CNNs with their dense layers) have no maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.errors import ConfigError
from finegrain.models.model import CosineLinear, FinegrainModel

MAP_OUTPUTS = ("embedding_map", "class_map")
_PASSIVE = (nn.Identity, nn.Dropout, nn.Flatten)


def _passive(module: nn.Module | None) -> bool:
    """True when ``module`` leaves a pooled vector as it is (identity, dropout, flatten, or none)."""
    if module is None or isinstance(module, _PASSIVE):
        return True
    if isinstance(module, nn.Sequential):
        return all(_passive(m) for m in module)
    return False


def pooling_module(backbone: nn.Module) -> nn.Module:
    """The module whose input is the backbone's last feature map and whose output (flattened) is its
    features; a :class:`ConfigError` for a backbone that does something else after pooling."""
    pool = getattr(backbone, "global_pool", None)  # timm
    if isinstance(pool, nn.Module) and hasattr(backbone, "forward_head"):
        after = [getattr(backbone, a, None) for a in ("head_drop", "classifier", "fc", "head")]
        if all(_passive(m) for m in after if isinstance(m, nn.Module)):
            return pool
    pool = getattr(backbone, "avgpool", None)  # torchvision
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        after = [getattr(backbone, a, None) for a in ("fc", "classifier")]
        if all(_passive(m) for m in after if isinstance(m, nn.Module)):
            return pool
    raise ConfigError(
        f"maps need a backbone whose features are the global pool of its last feature map "
        f"(timm models such as efficientnet_lite0, torchvision ResNets); {type(backbone).__name__} "
        "computes more after pooling"
    )


def maps_missing(model: nn.Module) -> str | None:
    """Why ``model`` gives no maps (not a finegrain model, or a backbone that computes more after
    pooling), or None when it gives them."""
    # start-up: deferred until this runs (keeps the heavy libraries out of plain imports)
    from finegrain.models.model import FinegrainModel

    if not isinstance(model, FinegrainModel):
        return f"maps need a finegrain model (a backbone and heads), not {type(model).__name__}"
    try:
        pooling_module(model.backbone)
    except ConfigError as e:
        return str(e)
    return None


def _locations(fmap: torch.Tensor) -> torch.Tensor:
    """``[B, F, h, w]`` to one row per location ``[B*h*w, F]``."""
    return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])


def _as_map(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B*h*w, K]`` back to ``[B, K, h, w]`` for a feature map shaped as ``like``."""
    b, _, h, w = like.shape
    return rows.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def _per_image(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-image scalar ``[B]`` repeated for each location row of ``like``'s map."""
    b, _, h, w = like.shape
    return scale.reshape(b, 1).expand(b, h * w).reshape(-1, 1)


def forward_with_maps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``model(x)`` (a :class:`FinegrainModel`) and, besides its outputs, ``embedding_map`` and (with a
    classifier) ``class_map`` (see the module docstring); the model runs once."""
    why = maps_missing(model)
    if why is not None or not isinstance(model, FinegrainModel):
        raise ConfigError(why or "maps need a finegrain model")

    captured: list[torch.Tensor] = []
    handle = pooling_module(model.backbone).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        out = dict(model(x))
    finally:
        handle.remove()
    fmap = captured[-1].float()
    f = out["features"].float()
    rows = _locations(fmap)
    f_norm = f.norm(dim=1).clamp_min(1e-12)
    embedder, classifier = model.embedder, model.classifier
    if embedder is not None:
        raw_rows = embedder(rows)
        if model.normalize_embedding:
            raw_norm = embedder(f).norm(dim=1).clamp_min(1e-12)
            out["embedding_map"] = _as_map(raw_rows / _per_image(raw_norm, fmap), fmap)
        else:
            out["embedding_map"] = _as_map(raw_rows, fmap)
    else:
        out["embedding_map"] = _as_map(rows / _per_image(f_norm, fmap), fmap)
    if classifier is not None:
        linear = [m for m in classifier.modules() if isinstance(m, nn.Linear)][-1]
        if isinstance(linear, CosineLinear):
            cls_rows = F.linear(rows, F.normalize(linear.weight, dim=1)) / (
                _per_image(f_norm, fmap) * linear.temperature
            )
        elif embedder is not None and model.classifier_on_embedding:
            cls_rows = classifier(raw_rows)  # the embedder's rows, computed above
        else:
            cls_rows = classifier(rows)
        out["class_map"] = _as_map(cls_rows, fmap)
    return out
