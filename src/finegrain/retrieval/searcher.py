"""Answering image queries against a run's gallery index.

:class:`Searcher` holds a run's model and index, loaded once; the CLI's ``search``, the
demo and the web service all query through it (the service uses only what
:class:`SearchService` declares, which tests and benchmarks fake with the same shape).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypedDict, runtime_checkable

import numpy as np
from PIL import Image

from finegrain.data.images import open_rgb, to_rgb
from finegrain.errors import FinegrainError
from finegrain.inference import open_encoder
from finegrain.inference.explain import softmax
from finegrain.machine import query_threads, set_faiss_threads
from finegrain.retrieval.gallery_root import inside, served_root
from finegrain.retrieval.index import GalleryIndex, check_k
from finegrain.runs import open_run

if TYPE_CHECKING:
    from finegrain.inference.engines import AnyEncoder

log = logging.getLogger(__name__)


@dataclass
class Hit:
    rank: int
    id: int
    label: str
    score: float
    path: str
    same_image: bool = False
    """The gallery image is the query itself: the same decoded pixels (:func:`pixels_digest`)."""


Prediction = list[tuple[str, float]]


class IndexFigures(TypedDict, total=False):
    """What a searcher may say about its index's size and accuracy (optional in ``/api/info``)."""

    index_bytes_per_vector: float | None
    """What the index's files hold per vector (codes, graph, float16 copy...)."""
    index_recall_at_10: float | None
    """An approximate index's recall@10 against exact search, measured when it was built."""
    index_lists: str | None
    """Where an IVF index's inverted lists live: ``in-ram``, or ``on-disk`` (memory-mapped)."""


class ExplainInfo(TypedDict):
    """Whether the service can say why it answered (``POST /api/explain``), and how."""

    available: bool
    reason: str | None
    """Why not, when it cannot (a model without maps, an export made before them)."""
    stored_maps: bool
    """The index holds each gallery image's map: explaining costs no second pass of the model."""


class Explainable(TypedDict, total=False):
    explain: ExplainInfo


class ServiceInfo(IndexFigures, Explainable):
    """What a searcher says about itself: ``/api/info`` without the server's own limits.
    No server paths: ``dataset`` is the dataset folder's name only."""

    run: str
    model: str
    """The backbone."""
    task: str
    dataset: str
    gallery_size: int
    embedding_dim: int | None
    metric: str | None
    index_kind: str | None
    has_classifier: bool
    engine: str
    created_at: str | None
    """When the index was built (ISO 8601)."""
    precision: str
    image_sizes: list[list[int]]
    """The sizes the model sees, ``[height, width]`` each."""


class NamedRun(Protocol):
    """A run, as far as the web service is concerned: its name."""

    @property
    def name(self) -> str: ...


@runtime_checkable
class SearchService(Protocol):
    """What the web service needs of a searcher, and all it uses."""

    @property
    def run(self) -> NamedRun: ...

    prediction_source: str
    """``classifier`` (the trained head's probabilities) or ``neighbours`` (their vote)."""
    engine: str
    """What runs the model: ``torch`` or ``onnx``."""

    @property
    def gallery_size(self) -> int: ...

    @property
    def info(self) -> ServiceInfo: ...

    def gallery_path(self, i: int) -> str:
        """The file of gallery image ``i`` (``0 <= i < gallery_size``)."""
        ...

    def search(self, image: Image.Image, k: int = 10) -> tuple[list[Hit], Prediction | None]: ...


def dataset_name(root: str | Path) -> str:
    """The last component of a dataset root: a server's folders stay private."""
    text = str(root).rstrip("\\/")
    return re.split(r"[\\/]", text)[-1] or text


def pixels_digest(image: Image.Image) -> str:
    """sha256 of an 8-bit RGB image's size and pixels: equal for the same picture however it was
    read (a file, an upload of its bytes), whatever engine or precision embeds it."""
    return hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()


Fingerprint = tuple[tuple[int, int], str]
"""An image's size and :func:`pixels_digest`."""

SAME_IMAGE_MIN_COSINE = 0.98
"""Only hits at least this close to the query are fingerprinted for ``same_image``: a copy scores about
1, and another engine or precision moves that by far less than 0.02, so a search reads only the few
gallery files that could be the query (for a Euclidean index: within the same angle, scaled by the
query's length)."""


def could_be_copies(hits: list[Hit], metric: str, query_norm: float) -> list[Hit]:
    """The hits close enough to the query to be a copy of it (see :data:`SAME_IMAGE_MIN_COSINE`);
    ``query_norm`` is the query embedding's length (for a Euclidean index's scores)."""
    if metric == "cosine":
        return [h for h in hits if h.score >= SAME_IMAGE_MIN_COSINE]
    radius = math.sqrt(2 * (1 - SAME_IMAGE_MIN_COSINE)) * query_norm
    return [h for h in hits if h.score <= radius]


def _file_fingerprint(path: str) -> Fingerprint | None:

    try:
        image = open_rgb(path)[0]
    except FinegrainError:  # the gallery file is gone or unreadable: not provably the same
        return None
    return image.size, pixels_digest(image)


def embedding_and_probabilities(out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """(embedding [1, D], class probabilities [C] or None) of one image's encoded outputs."""
    probs = softmax(out["logits"][0]) if "logits" in out else None
    return out["embedding"], probs


def check_ids(ids: list[int], gallery_size: int) -> None:
    """FinegrainError naming the first of ``ids`` that is no gallery id (``0 <= id < gallery_size``)."""
    bad = [i for i in ids if not 0 <= i < gallery_size]
    if bad:
        raise FinegrainError(f"no gallery image with id {bad[0]} (the gallery has {gallery_size})")


def label_name(names: list[str] | None, label: int) -> str:
    """The class name of an index label: empty for an unlabelled image (a negative label), the
    number itself when ``names`` does not name it."""
    if label < 0:
        return ""
    return names[label] if names and label < len(names) else str(label)


class IndexInfo(IndexFigures):
    """The part of :class:`ServiceInfo` that describes the gallery's index (or store)."""

    embedding_dim: int | None
    metric: str | None
    index_kind: str | None
    created_at: str | None


def share_cores(encoder: AnyEncoder, concurrency: int) -> int:
    """Give each of ``concurrency`` queries answered at once its share of the cores (the model's
    and FAISS's threads), so they never oversubscribe them; returns the threads per query."""
    threads = query_threads(concurrency)
    encoder.use_threads(threads)
    set_faiss_threads(threads)
    return threads


def prediction_source(encoder: AnyEncoder) -> str:
    """``classifier`` when the run predicts with its trained head, else ``neighbours``."""
    return "classifier" if encoder.has_classifier and encoder.cfg.predicts_with_classifier else "neighbours"


def explain_info(encoder: AnyEncoder, stored_maps: bool) -> ExplainInfo:
    """Whether a service over ``encoder`` can explain its answers (``stored_maps``: without a second pass)."""
    why = encoder.maps_missing()
    return {"available": why is None, "reason": why, "stored_maps": stored_maps}


def service_info(
    run: NamedRun, encoder: AnyEncoder, gallery_size: int, index: IndexInfo, stored_maps: bool
) -> ServiceInfo:
    """What a service over ``run``'s model and a gallery of ``gallery_size`` images says about itself
    (``/api/info`` without the server's limits; no server paths)."""
    cfg = encoder.cfg
    return {
        "run": run.name,
        "model": str(cfg.model.backbone),
        "task": str(cfg.task),
        "dataset": dataset_name(cfg.data.root),
        "gallery_size": gallery_size,
        **index,
        "has_classifier": bool(encoder.has_classifier),
        "engine": encoder.engine,
        "precision": str(encoder.precision),
        "image_sizes": [list(s) for s in encoder.sizes],
        "explain": explain_info(encoder, stored_maps),
    }


def predict(hits: list[Hit], probs: np.ndarray | None, source: str, class_names: list[str] | None) -> Prediction | None:
    """The top-5 classes of a search: the head's probabilities ``probs`` when ``source`` is
    ``classifier``, else the labelled neighbours' vote, their share per class (None without any);
    a copy of the query among the ``hits`` is flagged on its hit, not counted as a neighbour."""
    if probs is not None and source == "classifier":
        order = np.argsort(-probs)[:5]
        return [(label_name(class_names, int(c)), float(probs[c])) for c in order]
    neighbours = [h for h in hits if not h.same_image] or hits  # a copy of the query is not a vote
    voters = [h for h in neighbours if h.label]
    votes: dict[str, int] = {}
    for h in voters:
        votes[h.label] = votes.get(h.label, 0) + 1
    ranked = sorted(votes.items(), key=lambda kv: -kv[1])[:5]
    return [(label, n / len(voters)) for label, n in ranked] if voters else None


class Searcher:
    """A run's model and gallery index, loaded once, answering image queries."""

    def __init__(
        self, run_path: str | Path, index_dir: Path | None = None, precision: str | None = None, engine: str = "auto"
    ) -> None:

        self.run = open_run(run_path)
        self.encoder = open_encoder(self.run, engine, precision)  # torch or ONNX Runtime
        self.engine = self.encoder.engine
        self.cfg = self.encoder.cfg
        # GalleryIndex.load completes a save a kill interrupted, then refuses a missing or incomplete index
        checksum = self.encoder.loaded.checksum
        self.index = GalleryIndex.load(index_dir or self.run.index, expected_model_checksum=checksum)
        self.class_names = self.encoder.loaded.class_names
        self._gallery_root: Path | None = None
        self._fingerprints: dict[int, Fingerprint | None] = {}  # gallery id -> its fingerprint, as hits need them
        self.warn_on_mismatch()
        self.sizes = self.encoder.sizes
        self.prediction_source = prediction_source(self.encoder)

    @property
    def gallery_size(self) -> int:
        return len(self.index.paths)

    def share_cores(self, concurrency: int) -> int:
        return share_cores(self.encoder, concurrency)

    def _fingerprint(self, hit: Hit) -> Fingerprint | None:
        """A gallery hit's fingerprint, read once; None for a file outside the gallery folder (its
        content is no one's business) or unreadable."""
        if hit.id not in self._fingerprints:
            try:
                readable = inside(self.gallery_root, hit.path)
            except FinegrainError:  # too wide a gallery folder
                readable = False
            self._fingerprints[hit.id] = _file_fingerprint(hit.path) if readable else None
        return self._fingerprints[hit.id]

    def warn_on_mismatch(self) -> str | None:
        """Log (and return) a warning when this search embeds with another engine or precision than
        the index was built with: scores then differ slightly from the index's own."""
        built = (self.index.meta.get("engine"), self.index.meta.get("precision"))
        now = (self.engine, str(self.encoder.precision))
        if None in built or built == now:
            return None
        message = (
            f"the index was built with {built[0]} in {built[1]} and this search runs {now[0]} in {now[1]}: "
            f"scores differ slightly from the index's own (rebuild it with `finegrain index "
            f"{self.run.path} --engine {now[0]}` to match)"
        )
        log.warning(message)
        return message

    @property
    def gallery_root(self) -> Path:
        """The folder the gallery's images lie in (recorded when the index was built); FinegrainError
        when it is too wide to hand files out of."""
        if self._gallery_root is None:
            self._gallery_root = served_root(self.index.meta.get("gallery_root"), self.index.paths)
        return self._gallery_root

    def gallery_path(self, i: int) -> str:
        """Gallery image ``i``'s file, only when it lies in :attr:`gallery_root` (else FinegrainError)."""
        path = self.index.paths[i]
        if not inside(self.gallery_root, path):
            raise FinegrainError(f"gallery image {i} lies outside the gallery folder {self.gallery_root}")
        return path

    def hit_rgbs(self, ids: list[int]) -> list[Image.Image]:
        """The gallery images ``ids`` decoded to RGB (FinegrainError for an id not in the gallery)."""
        check_ids(ids, self.gallery_size)
        return [open_rgb(self.gallery_path(i))[0] for i in ids]

    @property
    def info(self) -> ServiceInfo:
        """What the service says about itself (no server paths)."""
        meta = self.index.meta
        index: IndexInfo = {
            "embedding_dim": meta.get("dim"),
            "metric": meta.get("metric"),
            "index_kind": meta.get("kind"),
            "index_bytes_per_vector": meta.get("bytes_per_vector"),
            "index_recall_at_10": meta.get("approx_recall_at_10"),
            "index_lists": (meta.get("params") or {}).get("lists"),
            "created_at": meta.get("created_at"),
        }
        return service_info(self.run, self.encoder, self.gallery_size, index, self.index.maps is not None)

    def encode(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        """(embedding [1, D], class probabilities [C] or None) of one image."""

        return embedding_and_probabilities(self.encoder.encode_rgb(to_rgb(image)[0]))

    def search(
        self, image: Image.Image, k: int = 10, encoded: tuple[np.ndarray, np.ndarray | None] | None = None
    ) -> tuple[list[Hit], Prediction | None]:
        """The k most similar gallery images and the top-5 classes: a classification run's
        head probabilities, else the share of the k neighbours in each class. ``encoded``: the
        image's :meth:`encode` when the caller has it already (an explained search's one pass)."""

        check_k(k, self.gallery_size)
        emb, probs = encoded if encoded is not None else self.encode(image)
        scores, ids = self.index.search(emb, k)
        names = self.index.class_names or self.class_names
        hits = [
            Hit(
                rank=r + 1,
                id=int(i),
                label=label_name(names, int(self.index.labels[i])),
                score=float(s),
                path=self.index.paths[i],
            )
            for r, (s, i) in enumerate(zip(scores[0], ids[0], strict=True))
            if i >= 0
        ]
        rgb, query = to_rgb(image)[0], None
        for h in could_be_copies(hits, self.index.metric, float(np.linalg.norm(emb))):
            # then by content: scores of a copy vary with the engine and precision
            mark = self._fingerprint(h)
            if mark is not None and mark[0] == rgb.size:
                query = query or pixels_digest(rgb)
                h.same_image = mark[1] == query
        return hits, predict(hits, probs, self.prediction_source, self.class_names)
