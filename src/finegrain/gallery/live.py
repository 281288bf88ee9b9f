"""A run's model over a living gallery store: what ``finegrain serve`` and ``finegrain gallery`` use.

:class:`LiveGallery` is a :class:`~finegrain.retrieval.searcher.SearchService` (the web service
searches through it as through a static index) that also adds images (decoded within the
server's pixel budget, encoded by the run's model, stored with their bytes), removes and
relabels them. The store is the run's ``gallery/`` folder unless another location is named; when it
is created, the index ``finegrain index`` built becomes its first content.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from finegrain.data.images import decode_bytes, resize_rgb, to_rgb
from finegrain.errors import FinegrainError
from finegrain.gallery.filters import Filter, check_label, check_metadata
from finegrain.gallery.importer import index_spec
from finegrain.gallery.store import Entry, GalleryStore, NewEntry, StoreSpec, open_store
from finegrain.inference import open_encoder
from finegrain.retrieval.index import check_k
from finegrain.retrieval.searcher import (
    Hit,
    IndexInfo,
    NamedRun,
    Prediction,
    ServiceInfo,
    could_be_copies,
    embedding_and_probabilities,
    predict,
    prediction_source,
    service_info,
    share_cores,
)
from finegrain.runs import RunDir, open_run

log = logging.getLogger(__name__)

STORE_FOLDER = "gallery"


def default_store(run: RunDir) -> Path:
    """Where a run's embedded store lives unless another is named: ``RUN/gallery``."""
    return run.path / STORE_FOLDER


def has_store(run_path: str | Path) -> bool:
    """Whether a run has its own embedded gallery store (``RUN/gallery``) to search."""
    # start-up: deferred until this runs (keeps the heavy libraries out of plain imports)
    from finegrain.gallery.embedded import DB_FILE

    return (default_store(open_run(run_path)) / DB_FILE).is_file()


def hit_files(live: LiveGallery, hits: list[Hit], folder: Path) -> list[Hit]:
    """``hits`` with each stored image written into ``folder`` and its path there (for a contact sheet)."""
    out = []
    for h in hits:
        stored = live.store.image(h.id)
        path = folder / f"{h.id}"
        if stored is not None:
            path.write_bytes(stored[0])
        out.append(replace(h, path=str(path)))
    return out


@dataclass(frozen=True)
class ImageBytes:
    """An image to add: its bytes and the name it came with (for messages and its media type)."""

    data: bytes
    name: str


@dataclass
class DecodedAdds:
    """Requests to add, decoded: each one's place in the answers and its entries (vectors to come), the
    images to encode in order, and the answers so far (the error of each request refused)."""

    accepted: list[tuple[int, list[NewEntry]]] = field(default_factory=list)
    rgbs: list[Image.Image] = field(default_factory=list)
    results: list[list[int] | FinegrainError] = field(default_factory=list)


@dataclass(frozen=True)
class AddRequest:
    """One add: its images, and the label and metadata they all get."""

    images: list[ImageBytes]
    label: str = ""
    metadata: dict[str, Any] | None = None


def media_type_of(im: Image.Image) -> str | None:
    return Image.MIME.get(im.format or "")


class LiveGallery:
    """A run's model and a gallery store: search, add, remove, relabel."""

    def __init__(
        self,
        run_path: str | Path,
        store: str | None = None,
        index_dir: Path | None = None,
        engine: str = "auto",
        precision: str | None = None,
    ) -> None:
        run = open_run(run_path)
        self.run: NamedRun = run
        self.encoder = open_encoder(run, engine, precision)
        self.engine = self.encoder.engine
        self.cfg = self.encoder.cfg
        self.sizes = self.encoder.sizes
        self.class_names = self.encoder.loaded.class_names
        self.prediction_source = prediction_source(self.encoder)
        index_dir = index_dir or run.index
        checksum = self.encoder.loaded.checksum
        spec = index_spec(index_dir, checksum, self.class_names) or StoreSpec(
            dim=self._embed(Image.new("RGB", (32, 32))).shape[0],
            metric="cosine",
            model_checksum=checksum,
            class_names=self.class_names,
        )
        self.store: GalleryStore = open_store(store or default_store(run), spec, import_from=index_dir)

    # -- SearchService -----------------------------------------------------------------------------
    @property
    def gallery_size(self) -> int:
        return self.store.count()

    def gallery_path(self, i: int) -> str:
        """The store's location (its images are in the store, not in files)."""
        return self.store.location

    def share_cores(self, concurrency: int) -> int:
        return share_cores(self.encoder, concurrency)

    @property
    def info(self) -> ServiceInfo:
        """As a static index's; the store keeps no maps (an explanation runs its hits again)."""
        spec = self.store.spec
        index: IndexInfo = {"embedding_dim": spec.dim, "metric": spec.metric, "index_kind": "flat", "created_at": None}
        return service_info(self.run, self.encoder, self.gallery_size, index, stored_maps=False)

    def hit_rgbs(self, ids: list[int]) -> list[Image.Image]:
        """The stored images ``ids`` decoded to RGB (FinegrainError for an id the store does not hold)."""
        rgbs = []
        for i in ids:
            stored = self.store.image(i)
            if stored is None:
                raise FinegrainError(f"no gallery image with id {i} (the gallery has {self.gallery_size})")
            rgbs.append(to_rgb(decode_bytes(stored[0], f"gallery image {i}"))[0])
        return rgbs

    def encode(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        """(embedding [1, D], class probabilities [C] or None) of one image."""
        return embedding_and_probabilities(self.encoder.encode_rgb(to_rgb(image)[0]))

    def _embed(self, image: Image.Image) -> np.ndarray:
        return self.encode(image)[0][0]

    def search(
        self, image: Image.Image, k: int = 10, encoded: tuple[np.ndarray, np.ndarray | None] | None = None
    ) -> tuple[list[Hit], Prediction | None]:
        hits, top, _ = self.search_where(image, k, None, encoded)
        return hits, top

    def search_where(
        self,
        image: Image.Image,
        k: int,
        where: Filter | None,
        encoded: tuple[np.ndarray, np.ndarray | None] | None = None,
    ) -> tuple[list[Hit], Prediction | None, dict[int, Entry]]:
        """The k nearest entries (of those ``where`` selects), the top-5 classes and the hits' entries.
        ``encoded``: the image's :meth:`encode` when the caller has it already (an explained search's one pass)."""
        check_k(k, max(1, self.gallery_size))
        embedding, probs = encoded if encoded is not None else self.encode(image)
        found = self.store.search(np.asarray(embedding).reshape(-1), k, where)
        entries = self.store.entries([i for i, _ in found])
        found = [(i, s) for i, s in found if i in entries]  # removed since the search: not shown
        hits = [
            Hit(rank=r + 1, id=i, label=entries[i].label, score=s, path=f"/gallery/{i}")
            for r, (i, s) in enumerate(found)
        ]
        close = could_be_copies(hits, self.store.spec.metric, float(np.linalg.norm(embedding)))
        if close:  # the pixels decide: a copy's score varies with the engine and precision
            rgb = to_rgb(image)[0]
            for h in close:
                h.same_image = self._same_pixels(rgb, h.id)
        return hits, predict(hits, probs, self.prediction_source, self.class_names), entries

    def _same_pixels(self, rgb: Image.Image, entry_id: int) -> bool:
        stored = self.store.image(entry_id)
        if stored is None:
            return False
        try:
            other = to_rgb(decode_bytes(stored[0], "gallery image"))[0]
        except FinegrainError:
            return False
        size = self.sizes[0]
        return bool(np.array_equal(resize_rgb(rgb, size), resize_rgb(other, size)))

    # -- writes ------------------------------------------------------------------------------------
    def add_many(
        self, requests: Sequence[AddRequest], max_pixels: int | None = None
    ) -> list[list[int] | FinegrainError]:
        """Add several requests' images at once: each request's ids (in its order), or the error that
        refused it. A request is all or nothing: an unreadable image (an :class:`ImageError`), a bad
        label or metadata, or an image the model gives no finite vector refuses it alone. The
        accepted requests' images are encoded as one batch and stored in one transaction: every id
        returned is durable, and an image sent twice (in one request or two) gets one id."""
        adds = self.decode_adds(requests, max_pixels)
        vectors = self.encoder.encode_rgbs(adds.rgbs)["embedding"] if adds.rgbs else np.empty((0, 0))
        return self.store_adds(adds, vectors)

    def decode_adds(self, requests: Sequence[AddRequest], max_pixels: int | None = None) -> DecodedAdds:
        """:meth:`add_many`'s first step: the requests' images decoded (within ``max_pixels``), checked."""
        adds = DecodedAdds()
        for r in requests:
            try:
                label, metadata = check_label(r.label), check_metadata(r.metadata)
                decoded = [decode_bytes(im.data, im.name, max_pixels=max_pixels) for im in r.images]
            except FinegrainError as e:
                adds.results.append(e)
                continue
            adds.results.append([])
            entries = [
                NewEntry(np.empty(0), label, im.data, media_type_of(d), metadata)
                for im, d in zip(r.images, decoded, strict=True)
            ]
            adds.accepted.append((len(adds.results) - 1, entries))
            adds.rgbs += [to_rgb(d)[0] for d in decoded]
        return adds

    def store_adds(self, adds: DecodedAdds, vectors: np.ndarray) -> list[list[int] | FinegrainError]:
        """:meth:`add_many`'s last step: the accepted images with their ``vectors`` (those of
        ``adds.rgbs``, in order) stored in one transaction; each request's ids or error."""
        out = list(adds.results)
        rows = iter(vectors)
        storing: list[tuple[int, list[NewEntry]]] = []
        for i, entries in adds.accepted:
            encoded = [replace(e, vector=next(rows)) for e in entries]
            if all(np.all(np.isfinite(e.vector)) for e in encoded):
                storing.append((i, encoded))
            else:
                out[i] = FinegrainError("the model gives no finite vector for an image of this request")
        if storing:
            ids = iter(self.store.add([e for _, entries in storing for e in entries]))
            for i, entries in storing:
                out[i] = [next(ids) for _ in entries]
        return out
