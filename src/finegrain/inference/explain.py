"""Why this answer: the maps of what a model looked at, in numpy only (the ONNX engine and the web
service run it without PyTorch).

Both engines give, beside a batch's outputs, per-location head outputs (see
:mod:`finegrain.models.maps` for how they are made, and ``forward_maps`` of each engine):
``class_map`` ``[C, h, w]`` whose mean over the locations is each class's logit, and
``embedding_map`` ``[D, h, w]`` whose mean is the embedding. From them:

- :func:`class_activation_map`: the class activation map of one class: where the evidence for the
  class is, against the other classes the model weighs (``class_map[c]`` minus the
  probability-weighted mean of every class's map; ``contrastive=False``: ``class_map[c]`` alone, the
  plain CAM; linear classifier, and the cosine head on normalised features);
- :func:`similarity_map`: each location of an image against another image's embedding,
  ``embedding_map . e_other``: which parts of the image made it alike the other. The query's map
  against a hit's embedding and the hit's map against the query's explain one neighbour.

What is exact and what is not: with average pooling (every backbone's default) and one size, the
mean of a plain class activation map is the class's logit (of the contrastive one,
``logit_c - sum_k p_k logit_k``) and the mean of a similarity map is the
cosine similarity of the two embeddings, exactly (a BN neck in eval mode is affine, so projecting
each location through the embedder is exact too). With flip averaging the maps of an image and of
its mirror (flipped back) are averaged, as the outputs are. With several sizes (multi-size testing)
each size's map is resized to a common size and the maps averaged: their mean is then the mean of
the per-size outputs only up to the bilinear resizing. With max or avg+max pooling the maps are an
approximation (their mean is not the output).

Display: :func:`to_unit` scales a map to [0, 1] (the image's own min to max), :func:`colorize`
applies viridis (colour-blind safe, monotonic in lightness), :func:`overlay` blends it on the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from finegrain.data.images import resize_rgb
from finegrain.errors import FinegrainError
from finegrain.inference.outputs import mean_of_halves, mean_over_sizes, named_outputs
from finegrain.metrics.retrieval import l2_normalize

EMBEDDING_MAP = "embedding_map"
CLASS_MAP = "class_map"
MAP_NAMES = (EMBEDDING_MAP, CLASS_MAP)
VIRIDIS_STOPS = tuple(
    "#440154 #48186a #472d7b #424086 #3b528b #33638d #2c728e #26828e #21918c "
    "#1fa088 #28ae80 #3fbc73 #5ec962 #84d44b #addc30 #d8e219 #fde725".split()
)
"""matplotlib's viridis at 17 evenly spaced stops from 0 to 1, as ``#rrggbb``: :data:`VIRIDIS` interpolates
linearly between them, as a viewer of the maps does (the search page, from the API's legend)."""
OVERLAY_ALPHA = 0.5


class NoMaps(FinegrainError):
    """The model gives no maps: its message says why (and what to do, when anything can be done)."""


class NeedsReexport(NoMaps):
    """The run's ONNX export was made before maps existed: it has no map outputs."""


def mirror_mean(both: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Flip averaging of a batch of ``n`` images followed by their mirrors: outputs averaged pairwise,
    maps (``[B, K, h, w]``) with the mirror's map flipped back first."""
    flipped_back = {k: np.concatenate([v[:n], v[n:, ..., ::-1]]) if k in MAP_NAMES else v for k, v in both.items()}
    return mean_of_halves(flipped_back, n)


def maps_outputs(arrays: dict[str, np.ndarray], n: int, flipped: bool) -> dict[str, np.ndarray]:
    """An engine's ``forward_maps`` result from the raw arrays of ``n`` images (followed by their
    mirrors when ``flipped``): :func:`named_outputs` plus the maps, float32."""
    if flipped:
        arrays = mirror_mean(arrays, n)
    return {**named_outputs(arrays), **{k: np.asarray(arrays[k], dtype=np.float32) for k in MAP_NAMES if k in arrays}}


@dataclass
class ImageMaps:
    """One image's outputs (averaged over sizes, ``[1, ...]`` as :meth:`encode_rgb` gives them) and its
    maps at each size the model saw it (``maps[name][i]``: ``[K, h_i, w_i]``)."""

    outputs: dict[str, np.ndarray]
    maps: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def predicted_class(self) -> int | None:
        logits = self.outputs.get("logits")
        return None if logits is None else int(np.argmax(logits[0]))

    @property
    def embedding(self) -> np.ndarray:
        """The image's L2-normalised embedding ``[D]``."""
        return l2_normalize(self.outputs["embedding"][:1])[0]


def explain_rgb(encoder: Any, rgb: Image.Image) -> ImageMaps:
    """One RGB image's outputs and maps at every size of ``encoder`` (either engine), each size
    resized as :meth:`encode_rgb` resizes it. :class:`NeedsReexport` for an ONNX export without maps."""
    return explain_rgbs(encoder, [rgb])[0]


def explain_rgbs(encoder: Any, rgbs: list[Image.Image]) -> list[ImageMaps]:
    """:func:`explain_rgb` of several images, in one forward pass per size."""

    per_size = [
        encoder.forward_maps(np.stack([resize_rgb(im, size).transpose(2, 0, 1) for im in rgbs]))
        for size in encoder.sizes
    ]
    images = []
    for i in range(len(rgbs)):
        outs = [{k: v[i : i + 1] for k, v in res.items() if k not in MAP_NAMES} for res in per_size]
        maps = {k: [res[k][i] for res in per_size] for k in MAP_NAMES if k in per_size[0]}
        images.append(ImageMaps(mean_over_sizes(outs), maps))
    return images


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 2-D float map resized to ``size`` = (height, width), bilinearly (pixel centres aligned)."""
    h, w = size
    if m.shape == (h, w):
        return m.astype(np.float32)
    img = Image.fromarray(np.ascontiguousarray(m, dtype=np.float32), mode="F")
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def _mean_resized(per_size: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    return np.mean([resize_map(m, size) for m in per_size], axis=0).astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - np.max(z, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def class_activation_map(
    image: ImageMaps, cls: int | None = None, size: tuple[int, int] | None = None, contrastive: bool = True
) -> np.ndarray:
    """The class activation map ``[H, W]`` of class ``cls`` (default: the predicted one), each size's
    map resized to ``size`` (default: the first size's map) and averaged.

    ``contrastive`` (the default): the class's map minus the mean of every class's map weighted by
    the model's probabilities, ``(w_c - sum_k p_k w_k) . m``: evidence for the class *against the
    others it could be*, whose mean is ``logit_c - sum_k p_k logit_k`` (the gradient of the class's
    log-probability, applied to each cell). Without it, the plain CAM ``w_c . m``, whose mean is the
    logit: it also lights up what raises every class's score alike (on a Stanford Cars classifier,
    removing its most salient pixels lowered the class's probability less than removing pixels at
    random; the contrastive map's removal lowered it most, see ``benchmarks/explain.py``)."""
    if CLASS_MAP not in image.maps:
        raise FinegrainError("this model has no classifier: explain it with a similarity map")
    cls = image.predicted_class if cls is None else int(cls)
    if contrastive:
        p = softmax(image.outputs["logits"][0].astype(np.float64)).astype(np.float32)
        per_size = [m[cls] - np.einsum("k,khw->hw", p, m) for m in image.maps[CLASS_MAP]]
    else:
        per_size = [m[cls] for m in image.maps[CLASS_MAP]]
    return _mean_resized(per_size, size or per_size[0].shape)


def similarity_map(image: ImageMaps, other: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Each location of ``image`` against the embedding ``other`` ``[D]`` (normalised here):
    ``[H, W]``, whose mean is the cosine similarity of the two (exactly at one size, average pooling)."""
    e = l2_normalize(np.asarray(other).reshape(1, -1))[0]
    per_size = [np.einsum("khw,k->hw", m, e) for m in image.maps[EMBEDDING_MAP]]
    return _mean_resized(per_size, size or per_size[0].shape)


def embedding_grid(per_size: list[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """One image's embedding maps ``[D, h_i, w_i]`` (one per size) as one ``[D, *grid]`` map: each
    channel resized to ``grid`` and the sizes averaged. What a gallery index stores per image: as
    the resizing and the mean are linear, its cells' dot products with a unit embedding ``e`` are
    :func:`similarity_map` of the same maps against ``e`` at ``grid``."""
    h, w = grid
    out = np.zeros((per_size[0].shape[0], h, w), dtype=np.float32)
    for m in per_size:
        out += m if m.shape[1:] == (h, w) else np.stack([resize_map(c, grid) for c in m])
    return out / len(per_size)


def pair_maps(query: ImageMaps, hit: ImageMaps, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Why a query and a gallery image match: the query's map against the hit's embedding, and the
    hit's map against the query's."""
    return similarity_map(query, hit.embedding, size), similarity_map(hit, query.embedding, size)


# --------------------------------------------------------------------------- display


def to_unit(m: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] from its own minimum to its maximum (all zeros when it is constant)."""
    lo, hi = float(np.min(m)), float(np.max(m))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 1e-12:
        return np.zeros_like(m, dtype=np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def _viridis_lut() -> np.ndarray:
    anchors = np.array([[int(c[j : j + 2], 16) for j in (1, 3, 5)] for c in VIRIDIS_STOPS], dtype=np.float32)
    x = np.linspace(0, 1, len(anchors))
    t = np.linspace(0, 1, 256)
    return np.stack([np.interp(t, x, anchors[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


VIRIDIS = _viridis_lut()
"""``[256, 3]`` uint8: viridis, from dark purple (0, least) to yellow (1, most)."""


def _levels(m01: np.ndarray) -> np.ndarray:
    """A [0, 1] map as uint8 indices into :data:`VIRIDIS`."""
    return np.clip(np.rint(np.nan_to_num(m01) * 255), 0, 255).astype(np.uint8)


def colorize(m01: np.ndarray) -> np.ndarray:
    """A [0, 1] map as viridis colours, uint8 ``[H, W, 3]``."""
    return VIRIDIS[_levels(m01)]


def overlay(rgb: np.ndarray, m01: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``rgb`` (uint8 ``[H, W, 3]``) with the map, resized to it, blended on at ``alpha``."""
    colours = colorize(resize_map(m01, rgb.shape[:2])).astype(np.float32)
    return np.clip(rgb.astype(np.float32) * (1 - alpha) + colours * alpha, 0, 255).round().astype(np.uint8)
