"""Why a search answered as it did: the maps of a query and of its hits (numpy and either engine;
the map math is :mod:`finegrain.inference.explain`'s).

For a query and the gallery ids of its hits, :meth:`SearchExplainer.explain` gives

- the query's map: the class activation map of the predicted class when the run predicts with its
  classifier, else the query's similarity map against the first hit's embedding;
- for each hit, its map against the query's embedding (which parts of the gallery image made it
  alike the query) and the query's map against the hit's embedding.

Maps are ``[h, w]`` on the grid of the model's last feature map at the first size (a few cells a
side), scaled to [0, 1] each on its own; a viewer stretches them over the image. Explaining costs
one forward pass of the query and one of all the hits together, per size; a plain search pays none of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from finegrain.data.images import open_rgb, to_rgb
from finegrain.errors import FinegrainError
from finegrain.inference.explain import (
    ImageMaps,
    class_activation_map,
    explain_rgbs,
    similarity_map,
    to_unit,
)


@dataclass
class HitMaps:
    id: int
    map: np.ndarray
    """The hit's map against the query's embedding, [0, 1]."""
    query_map: np.ndarray
    """The query's map against the hit's embedding, [0, 1]."""
    similarity: float
    """The cosine similarity of the two embeddings as this explanation computed them."""
    image_size: tuple[int, int]
    """(height, width) of the gallery image: a viewer lays the map over it stretched to this shape."""


@dataclass
class Explanation:
    kind: str
    """``class`` (the query's map is the predicted class's activation map) or ``similarity``."""
    explains: str
    """What the query's map is evidence for: the predicted class's name, or ``closest match``."""
    query_map: np.ndarray
    query_size: tuple[int, int]
    """(height, width) of the query image."""
    hits: list[HitMaps] = field(default_factory=list)


@runtime_checkable
class ExplainService(Protocol):
    """What the web service needs to explain a search."""

    def explain(self, image: Image.Image, ids: list[int]) -> Explanation: ...


class SearchExplainer:
    """Explains the answers of a :class:`~finegrain.retrieval.searcher.Searcher` (its encoder, its
    gallery's files and class names)."""

    def __init__(self, searcher) -> None:
        self.searcher = searcher
        self.encoder = searcher.encoder

    def _explains_class(self, query: ImageMaps) -> bool:
        return self.searcher.prediction_source == "classifier" and query.predicted_class is not None

    def explain(self, image: Image.Image, ids: list[int]) -> Explanation:
        """The maps of ``image`` (a query) and of the gallery images ``ids`` (its hits)."""
        size = self.searcher.gallery_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise FinegrainError(f"no gallery image with id {bad[0]} (the gallery has {size})")
        rgbs = [to_rgb(image)[0]] + [open_rgb(Path(self.searcher.gallery_path(i)))[0] for i in ids]
        query, *hits = explain_rgbs(self.encoder, rgbs)
        grid = query.maps["embedding_map"][0].shape[1:]
        maps = [
            HitMaps(
                id=i,
                map=to_unit(similarity_map(h, query.embedding, grid)),
                query_map=to_unit(similarity_map(query, h.embedding, grid)),
                similarity=float(query.embedding @ h.embedding),
                image_size=(rgb.height, rgb.width),
            )
            for i, h, rgb in zip(ids, hits, rgbs[1:], strict=True)
        ]
        query_size = (rgbs[0].height, rgbs[0].width)
        if self._explains_class(query):
            cls = int(query.predicted_class or 0)
            names = self.searcher.class_names
            label = names[cls] if 0 <= cls < len(names) else str(cls)
            return Explanation("class", label, to_unit(class_activation_map(query, cls, grid)), query_size, maps)
        if not maps:
            raise FinegrainError("explaining a search without a classifier needs the id of at least one hit")
        return Explanation("similarity", "closest match", maps[0].query_map, query_size, maps)
