"""Why a search answered as it did: the maps of a query and of its hits (numpy and either engine;
the map math is :mod:`finegrain.inference.explain`'s).

For a query and the gallery ids of its hits, :meth:`SearchExplainer.explain` gives

- the query's map: the class activation map of the predicted class when the run predicts with its
  classifier, else the query's similarity map against the first hit's embedding;
- for each hit, its map against the query's embedding (which parts of the gallery image made it
  alike the query) and the query's map against the hit's embedding.

Maps are ``[h, w]`` on the grid of the model's last feature map at the first size (a few cells a
side), scaled to [0, 1] each on its own; a viewer stretches them over the image. Explaining costs
one forward pass of the query (:meth:`SearchExplainer.search`: the same pass that searches) and dot
products with the hits' maps that the index stores (``finegrain index`` writes them when the model
gives maps); for an index without them, or a living gallery (its store keeps no maps), one more pass
of all the hits together, per size, over the images the searcher hands out (its ``hit_rgbs``: an
index's files, a store's bytes). A plain search pays none of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
from PIL import Image

from finegrain.data.images import image_size, to_rgb
from finegrain.errors import FinegrainError
from finegrain.inference.explain import (
    EMBEDDING_MAP,
    ImageMaps,
    class_activation_map,
    embedding_grid,
    explain_rgb,
    explain_rgbs,
    to_unit,
)
from finegrain.metrics.retrieval import l2_normalize
from finegrain.retrieval.searcher import Hit, embedding_and_probabilities

T = TypeVar("T")
Encoded = tuple[np.ndarray, np.ndarray | None]
"""A query's (embedding [1, D], class probabilities [C] or None), as a searcher's ``encode`` gives them."""
SearchFn = Callable[[Image.Image, Encoded], tuple[list[Hit], T]]
"""A search of an RGB query already encoded: its hits and whatever else the searcher answers."""


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

    def unavailable(self) -> str | None:
        """Why the service cannot explain (its model gives no maps), or None when it can."""
        ...

    def explain(self, image: Image.Image, ids: list[int]) -> Explanation: ...

    def search(self, image: Image.Image, k: int) -> tuple[list[Hit], list[tuple[str, float]] | None, Explanation]:
        """An explained search: the hits, the prediction and their :class:`Explanation`."""
        ...

    def search_with(self, image: Image.Image, search: SearchFn[T]) -> tuple[list[Hit], T, Explanation]:
        """An explained search: ``search``'s answer (its hits first) and the hits' :class:`Explanation`."""
        ...


class SearchExplainer:
    """Explains the answers of a searcher: a :class:`~finegrain.retrieval.searcher.Searcher` (its
    encoder, its gallery's files and class names, and the maps its index stores, when it stores them)
    or a :class:`~finegrain.gallery.live.LiveGallery` (its store's images)."""

    def __init__(self, searcher) -> None:
        self.searcher = searcher
        self.encoder = searcher.encoder
        self._sizes: dict[int, tuple[int, int]] = {}  # gallery id -> (height, width) of its image

    @property
    def stored_maps(self) -> np.ndarray | None:
        """The index's ``[N, D, h, w]`` maps, or None (an index built without them: hits run again)."""
        index = getattr(self.searcher, "index", None)
        return getattr(index, "maps", None)

    def unavailable(self) -> str | None:
        """Why this searcher cannot explain (its model gives no maps), or None when it can."""
        return self.encoder.maps_missing()

    def _explains_class(self, query: ImageMaps) -> bool:
        return self.searcher.prediction_source == "classifier" and query.predicted_class is not None

    def explain(self, image: Image.Image, ids: list[int]) -> Explanation:
        """The maps of ``image`` (a query) and of the gallery images ``ids`` (its hits)."""
        stored = self.stored_maps
        if stored is not None and all(0 <= i < len(stored) for i in ids):
            rgbs = None  # the index stores their maps
        else:  # read (and check) the hits' images before the query's pass
            rgbs = self.searcher.hit_rgbs(ids)
        rgb = to_rgb(image)[0]
        return self._explain(explain_rgb(self.encoder, rgb), rgb, ids, rgbs)

    def search(self, image: Image.Image, k: int) -> tuple[list[Hit], list[tuple[str, float]] | None, Explanation]:
        """An explained search: the searcher's hits and prediction and their :class:`Explanation`."""

        def search(rgb: Image.Image, encoded: Encoded) -> tuple[list[Hit], list[tuple[str, float]] | None]:
            return self.searcher.search(rgb, k, encoded=encoded)

        return self.search_with(image, search)

    def search_with(self, image: Image.Image, search: SearchFn[T]) -> tuple[list[Hit], T, Explanation]:
        """``search`` (e.g. a filtered one) explained, from one pass of the model over the query (its maps
        come with its outputs) when the index stores the hits' maps, else one more over the hits."""
        rgb = to_rgb(image)[0]
        query = explain_rgb(self.encoder, rgb)
        hits, rest = search(rgb, embedding_and_probabilities(query.outputs))
        return hits, rest, self._explain(query, rgb, [h.id for h in hits])

    def _image_size(self, i: int) -> tuple[int, int]:
        if i not in self._sizes:  # read once per gallery image (its header)
            self._sizes[i] = image_size(self.searcher.gallery_path(i))
        return self._sizes[i]

    def _hit_maps(
        self, ids: list[int], grid: tuple[int, int], rgbs: list[Image.Image] | None = None
    ) -> tuple[np.ndarray, np.ndarray, list]:
        """The hits' ``[n, D, h, w]`` embedding maps on ``grid``, their unit embeddings ``[n, D]`` and
        image sizes: from the index when it stores maps on this grid, else from one pass over the hits
        (``rgbs``, or the searcher's images of them)."""
        stored = self.stored_maps
        if stored is not None and tuple(stored.shape[2:]) == tuple(grid) and max(ids) < len(stored):
            maps = np.asarray(stored[np.asarray(ids)], dtype=np.float32)
            # a stored map's mean over its cells is the image's embedding (exact at one size); a matrix
            # product takes it ~10x faster than a mean over the few cells of each of 10^4 rows (0.6 ms)
            n, dim, cells = maps.shape[0], maps.shape[1], maps.shape[2] * maps.shape[3]
            embeddings = l2_normalize(maps.reshape(n, dim, cells) @ np.full(cells, 1 / cells, dtype=np.float32))
            return maps, embeddings, [self._image_size(i) for i in ids]
        if rgbs is None:
            rgbs = self.searcher.hit_rgbs(ids)
        hits = explain_rgbs(self.encoder, rgbs)
        maps = np.stack([embedding_grid(h.maps[EMBEDDING_MAP], grid) for h in hits])
        return maps, np.stack([h.embedding for h in hits]), [(im.height, im.width) for im in rgbs]

    def _explain(
        self, query: ImageMaps, rgb: Image.Image, ids: list[int], rgbs: list[Image.Image] | None = None
    ) -> Explanation:
        first = query.maps[EMBEDDING_MAP][0].shape
        grid = (int(first[1]), int(first[2]))
        hits: list[HitMaps] = []
        if ids:
            maps, embeddings, sizes = self._hit_maps(ids, grid, rgbs)
            # both sides at once: each hit's cells against the query's embedding, the query's cells
            # against each hit's (resizing and averaging the sizes are linear: as similarity_map)
            e_query = query.embedding
            hit_cells = np.einsum("nkhw,k->nhw", maps, e_query)
            query_cells = np.einsum("khw,nk->nhw", embedding_grid(query.maps[EMBEDDING_MAP], grid), embeddings)
            similarities = embeddings @ e_query
            hits = [
                HitMaps(id=i, map=to_unit(h), query_map=to_unit(q), similarity=float(sim), image_size=hw)
                for i, h, q, sim, hw in zip(ids, hit_cells, query_cells, similarities, sizes, strict=True)
            ]
        query_size = (rgb.height, rgb.width)
        if self._explains_class(query):
            cls = int(query.predicted_class or 0)
            names = self.searcher.class_names
            label = names[cls] if 0 <= cls < len(names) else str(cls)
            return Explanation("class", label, to_unit(class_activation_map(query, cls, grid)), query_size, hits)
        if not hits:
            raise FinegrainError("explaining a search without a classifier needs the id of at least one hit")
        return Explanation("similarity", "closest match", hits[0].query_map, query_size, hits)
