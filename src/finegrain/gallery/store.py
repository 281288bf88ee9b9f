"""One interface for every gallery store backend, and the registry that opens them.

A store holds entries (an integer id, a label, a JSON metadata object, the sha256 of the image's
bytes, the image itself and its vector) and answers nearest-neighbour searches over them,
optionally restricted by a :class:`~finegrain.gallery.filters.Filter`. Backends: ``embedded``
(SQLite + FAISS, :mod:`finegrain.gallery.embedded`) and ``milvus``
(:mod:`finegrain.gallery.milvus_store`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from finegrain.errors import FinegrainError
from finegrain.gallery.filters import Filter
from finegrain.registry import Registry

METRICS = ("cosine", "euclidean")
MILVUS_SCHEME = "milvus://"


@dataclass(frozen=True)
class StoreSpec:
    """What every vector of a store shares: its dimension, metric and the model that made it."""

    dim: int
    metric: str
    model_checksum: str
    class_names: list[str] | None = None


@dataclass(frozen=True)
class Entry:
    """One gallery entry (without its vector and image bytes)."""

    id: int
    label: str
    metadata: dict[str, Any]
    sha256: str
    media_type: str | None
    added_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "metadata": self.metadata,
            "sha256": self.sha256,
            "media_type": self.media_type,
            "added_at": self.added_at,
            "url": f"/gallery/{self.id}",
        }


@dataclass(frozen=True)
class NewEntry:
    """What an add brings: the vector [D], its label and metadata, and the image's bytes."""

    vector: np.ndarray
    label: str
    image: bytes
    media_type: str | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.image).hexdigest()


Neighbours = list[tuple[int, float]]
"""(id, score) pairs, best first: cosine similarity (higher first) or Euclidean distance (lower first)."""


@runtime_checkable
class GalleryStore(Protocol):
    """What every backend does. Writes are durable when they return; ids are never reused."""

    spec: StoreSpec
    location: str

    def add(self, entries: Sequence[NewEntry]) -> list[int]:
        """Ids of ``entries`` in order; an image whose bytes are already stored keeps its existing id."""
        ...

    def remove(self, entry_id: int) -> bool:
        """Remove an entry and its image; False if there was none."""
        ...

    def update(self, entry_id: int, label: str | None = None, metadata: dict[str, Any] | None = None) -> Entry | None:
        """Set the label and/or replace the metadata; the updated entry, or None if there is none."""
        ...

    def get(self, entry_id: int) -> Entry | None: ...

    def image(self, entry_id: int) -> tuple[bytes, str | None] | None:
        """(the image's bytes, its media type) or None."""
        ...

    def list(self, label: str | None = None, offset: int = 0, limit: int = 100) -> list[Entry]:
        """Entries in id order, optionally of one label."""
        ...

    def count(self, label: str | None = None) -> int: ...

    def labels(self) -> dict[str, int]:
        """Entries per label."""
        ...

    def entries(self, ids: Sequence[int]) -> dict[int, Entry]:
        """The entries of ``ids`` that exist, by id."""
        ...

    def search(self, query: np.ndarray, k: int, where: Filter | None = None) -> Neighbours:
        """The ``k`` nearest entries of one query vector [D] (those matching ``where`` only)."""
        ...

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N], vectors [N, D] as searched: normalised for cosine) of every entry."""
        ...

    def close(self) -> None: ...


StoreOpener = Callable[[str, "StoreSpec | None", "Path | None"], GalleryStore]
STORES: Registry[StoreOpener] = Registry("gallery store backend")
"""Backend name → opener(location, spec or None to read it from the store, index folder to import)."""


def now_iso() -> str:
    """The current UTC time as an ISO 8601 string to the second (an entry's ``added_at``)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def backend_of(location: str) -> tuple[str, str]:
    """(backend, location for it) of a ``--store`` value: ``milvus://HOST:PORT/COLLECTION`` or a
    Milvus Lite file (``*.db``) is ``milvus``, ``NAME://...`` names a backend, anything else is an
    ``embedded`` store's folder."""
    text = str(location)
    if text.startswith(MILVUS_SCHEME) or text.endswith(".db"):
        return "milvus", text
    if "://" in text:
        name, _, rest = text.partition("://")
        STORES.get(name)  # an unknown backend is named with the known ones
        return name, rest
    return "embedded", text


def open_store(location: str | Path, spec: StoreSpec | None = None, import_from: Path | None = None) -> GalleryStore:
    """Open (or create, with ``spec``, importing the index in ``import_from`` if there is one) the store
    at ``location``. A store made by another model than ``spec`` says is refused."""
    _register_backends()
    backend, where = backend_of(str(location))
    store = STORES.get(backend)(where, spec, import_from)
    if spec is not None and (store.spec.model_checksum, store.spec.dim, store.spec.metric) != (
        spec.model_checksum,
        spec.dim,
        spec.metric,
    ):
        store.close()
        raise FinegrainError(
            f"the gallery store {location} was made by another model or metric "
            f"({store.spec.model_checksum[:12]}…, {store.spec.dim}-d {store.spec.metric}); "
            f"this model is {spec.model_checksum[:12]}… ({spec.dim}-d {spec.metric}): name another "
            "store with --store, or move this one away to start a new one from the run's index"
        )
    return store


MAX_IDS = 1000
"""Entries fetched by id at most at once (a page of hits or of a listing)."""


class StoreBase:
    """What every backend does the same way: :meth:`get` is one of :meth:`entries`."""

    def entries(self, ids: Sequence[int]) -> dict[int, Entry]:
        raise NotImplementedError

    def get(self, entry_id: int) -> Entry | None:
        return self.entries([entry_id]).get(int(entry_id))


def id_list(ids: Sequence[int]) -> list[int]:
    """``ids`` as ints, at most :data:`MAX_IDS` of them."""
    return [int(i) for i in ids][:MAX_IDS]


def _register_backends() -> None:
    """Import the backends (each registers itself); Milvus's client is imported only when used."""
    # the backends import this module: they can only be loaded once it is
    import finegrain.gallery.backends  # noqa: F401


def check_vector(vector: np.ndarray, spec: StoreSpec) -> np.ndarray:
    """``vector`` as float32 [D], finite, normalised for cosine."""
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if v.shape[0] != spec.dim:
        raise FinegrainError(f"a {v.shape[0]}-d vector for a store of {spec.dim}-d vectors")
    if not np.all(np.isfinite(v)):
        raise FinegrainError("the vector holds NaN or infinite values")
    if spec.metric == "cosine":
        norm = float(np.linalg.norm(v))
        v = v / norm if norm > 0 else v
    return np.ascontiguousarray(v, dtype=np.float32)
