"""The ``milvus`` gallery store: vectors, labels and metadata in a Milvus collection.

``--store milvus://HOST:PORT/COLLECTION`` uses a Milvus server or cluster (shared by several
``finegrain serve`` processes); ``--store FILE.db`` runs Milvus Lite in-process
(``pip install 'finegrain[milvus]'``). The collection searches exactly (a FLAT index); filters are
Milvus expressions built by :func:`~finegrain.gallery.filters.milvus_expression`. The spec (dim,
metric, model) is kept in a companion collection ``COLLECTION_spec``. The images' bytes are not a
vector database's business: they are kept in a local SQLite file beside a Milvus Lite file, or in
``$FINEGRAIN_MILVUS_IMAGES`` (default ``./COLLECTION.images.sqlite``) for a server: give every server
the same file on shared storage, or the images of one are not served by the others.
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.errors import FinegrainError
from finegrain.gallery.filters import Filter, milvus_expression, milvus_literal
from finegrain.gallery.importer import index_entries
from finegrain.gallery.store import (
    METRICS,
    MILVUS_SCHEME,
    STORES,
    Entry,
    GalleryStore,
    Neighbours,
    NewEntry,
    StoreBase,
    StoreSpec,
    check_vector,
    id_list,
    now_iso,
)

DEFAULT_COLLECTION = "finegrain_gallery"
IMAGES_ENV = "FINEGRAIN_MILVUS_IMAGES"
MAX_ROWS = 16384
"""Milvus answers at most this many rows per query: listings page within it."""
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
_HEX_RE = re.compile(r"(missing-|vector-)?[0-9a-f]{32,64}")
FIELDS = ["id", "label", "metadata", "sha256", "media_type", "added_at"]


def parse_location(location: str) -> tuple[str, str, Path]:
    """(Milvus URI, collection, images file) of a ``--store`` value."""
    if location.startswith(MILVUS_SCHEME):
        hostport, _, collection = location[len(MILVUS_SCHEME) :].partition("/")
        if not hostport:
            raise FinegrainError(f"--store {location}: give milvus://HOST:PORT/COLLECTION")
        uri = f"http://{hostport}"
        collection = collection or DEFAULT_COLLECTION
        images = Path(os.environ.get(IMAGES_ENV) or f"{collection}.images.sqlite")
    else:
        uri, collection = location, DEFAULT_COLLECTION
        images = Path(location).with_suffix(".images.sqlite")
    if not _NAME_RE.fullmatch(collection):
        raise FinegrainError(f"--store {location}: a collection name is letters, digits and _")
    return uri, collection, images


class ImageFiles:
    """The images' bytes by sha256, in a local SQLite file (WAL, synchronous=FULL)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS images (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL)")
        self.lock = threading.Lock()

    def put(self, sha: str, data: bytes) -> None:
        with self.lock:
            self.conn.execute("INSERT OR IGNORE INTO images (sha256, data) VALUES (?, ?)", (sha, data))

    def get(self, sha: str) -> bytes | None:
        with self.lock:
            row = self.conn.execute("SELECT data FROM images WHERE sha256 = ?", (sha,)).fetchone()
        return None if row is None else bytes(row[0])

    def delete(self, sha: str) -> None:
        with self.lock:
            self.conn.execute("DELETE FROM images WHERE sha256 = ?", (sha,))

    def close(self) -> None:
        self.conn.close()


def _entry(row: dict[str, Any]) -> Entry:
    return Entry(
        id=int(row["id"]),
        label=str(row["label"]),
        metadata=dict(row["metadata"] or {}),
        sha256=str(row["sha256"]),
        media_type=row["media_type"] or None,
        added_at=str(row["added_at"]),
    )


class MilvusStore(StoreBase):
    """A gallery store in a Milvus collection (a server, a cluster or Milvus Lite)."""

    def __init__(self, location: str, spec: StoreSpec | None = None, import_from: Path | None = None) -> None:
        try:
            # optional: the milvus extra, loaded only where this runs
            from pymilvus import MilvusClient
        except ImportError:
            raise FinegrainError(
                "the milvus gallery store needs pymilvus (and milvus-lite for a *.db file): "
                "pip install 'finegrain[milvus]'"
            ) from None
        self.location = location
        uri, self.collection, images = parse_location(location)
        try:
            self.client = MilvusClient(uri)
        except Exception as e:  # noqa: BLE001 - connection refused, bad file...
            raise FinegrainError(f"cannot open the Milvus store {location}: {str(e).splitlines()[0][:200]}") from None
        self.images = ImageFiles(images)
        self._last_id = 0
        self._id_lock = threading.Lock()
        if not self.client.has_collection(self.collection):
            self._create(spec, import_from)
        for name in (self.collection, f"{self.collection}_spec"):  # a reopened collection starts released
            if self.client.has_collection(name):
                self.client.load_collection(name)
        self.spec = self._read_spec()

    # -- the collection ------------------------------------------------------------------------------
    def _create(self, spec: StoreSpec | None, import_from: Path | None) -> None:
        # optional: the milvus extra, loaded only where this runs
        from pymilvus import DataType, MilvusClient

        if spec is None:
            raise FinegrainError(
                f"no gallery collection {self.collection} in {self.location} "
                "(serve the run with --store, or `finegrain gallery add`, to create it)"
            )
        if spec.metric not in METRICS:
            raise FinegrainError(f"unknown metric {spec.metric!r}; valid: {', '.join(METRICS)}")
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=spec.dim)
        schema.add_field("label", DataType.VARCHAR, max_length=1024)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("sha256", DataType.VARCHAR, max_length=80)
        schema.add_field("media_type", DataType.VARCHAR, max_length=100)
        schema.add_field("added_at", DataType.VARCHAR, max_length=40)
        params = self.client.prepare_index_params()
        params.add_index("vector", index_type="FLAT", metric_type="IP" if spec.metric == "cosine" else "L2")
        spec_schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        spec_schema.add_field("id", DataType.INT64, is_primary=True)
        spec_schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
        spec_schema.add_field("spec", DataType.JSON)
        spec_params = self.client.prepare_index_params()
        spec_params.add_index("vector", index_type="FLAT", metric_type="L2")
        self.client.create_collection(
            f"{self.collection}_spec", schema=spec_schema, index_params=spec_params, consistency_level="Strong"
        )
        self.client.create_collection(self.collection, schema=schema, index_params=params, consistency_level="Strong")
        if import_from is not None:
            rows = []
            for e in index_entries(import_from, spec):
                if e.image is not None:
                    self.images.put(e.sha256, e.image)
                rows.append(
                    {
                        "id": e.id,
                        "vector": e.vector.tolist(),
                        "label": e.label,
                        "metadata": e.metadata,
                        "sha256": e.sha256,
                        "media_type": e.media_type or "",
                        "added_at": now_iso(),
                    }
                )
            for start in range(0, len(rows), 1000):
                self.client.insert(self.collection, rows[start : start + 1000])
        self.client.insert(
            f"{self.collection}_spec",
            [
                {
                    "id": 0,
                    "vector": [0.0, 0.0],
                    "spec": {
                        "dim": spec.dim,
                        "metric": spec.metric,
                        "model_checksum": spec.model_checksum,
                        "class_names": spec.class_names,
                    },
                }
            ],
        )  # last: a collection without its spec was not finished

    def _read_spec(self) -> StoreSpec:
        rows = (
            self.client.query(f"{self.collection}_spec", filter="id == 0", output_fields=["spec"])
            if self.client.has_collection(f"{self.collection}_spec")
            else []
        )
        if not rows:
            raise FinegrainError(
                f"the Milvus collection {self.collection} in {self.location} is not a finished "
                f"finegrain gallery (no {self.collection}_spec): drop it or name another"
            )
        s = rows[0]["spec"]
        return StoreSpec(
            dim=int(s["dim"]),
            metric=str(s["metric"]),
            model_checksum=str(s["model_checksum"]),
            class_names=s.get("class_names"),
        )

    def _new_id(self) -> int:
        """An id no other writer takes: microseconds since 1970 (below 2**53, exact in JSON) with random low bits."""
        with self._id_lock:
            candidate = (time.time_ns() // 1000) * 4 + random.randrange(4)
            self._last_id = max(candidate, self._last_id + 1)
            return self._last_id

    def _query(self, expr: str, fields: list[str], limit: int = MAX_ROWS) -> list[dict[str, Any]]:
        return list(self.client.query(self.collection, filter=expr, output_fields=fields, limit=limit))

    # -- writes --------------------------------------------------------------------------------------
    def add(self, entries: Sequence[NewEntry]) -> list[int]:
        checked = [(e, check_vector(e.vector, self.spec), e.sha256) for e in entries]
        shas = sorted({sha for _, _, sha in checked})
        seen: dict[str, int] = {}
        for start in range(0, len(shas), 500):  # the images already stored: one query per 500
            chunk = shas[start : start + 500]
            for r in self._query(f"sha256 in [{', '.join(map(milvus_literal, chunk))}]", ["id", "sha256"]):
                seen[str(r["sha256"])] = min(int(r["id"]), seen.get(str(r["sha256"]), int(r["id"])))
        ids: list[int] = []
        rows: list[dict[str, Any]] = []
        for e, vector, sha in checked:
            if sha not in seen:
                self.images.put(sha, e.image)  # first: an entry is never without its image
                seen[sha] = self._new_id()
                rows.append(
                    {
                        "id": seen[sha],
                        "vector": vector.tolist(),
                        "label": e.label,
                        "metadata": e.metadata,
                        "sha256": sha,
                        "media_type": e.media_type or "",
                        "added_at": now_iso(),
                    }
                )
            ids.append(seen[sha])
        if rows:
            self.client.insert(self.collection, rows)  # one insert: the batch is answered once it is in
        return ids

    def add_vectors(self, vectors: np.ndarray, labels: Sequence[str]) -> list[int]:
        """Add bare vectors (no image; for benchmarks)."""
        rows = [
            {
                "id": self._new_id(),
                "vector": check_vector(v, self.spec).tolist(),
                "label": label,
                "metadata": {},
                "sha256": f"vector-{random.getrandbits(128):032x}",
                "media_type": "",
                "added_at": now_iso(),
            }
            for v, label in zip(np.asarray(vectors), labels, strict=True)
        ]
        for start in range(0, len(rows), 1000):
            self.client.insert(self.collection, rows[start : start + 1000])
        return [int(r["id"]) for r in rows]

    def remove(self, entry_id: int) -> bool:
        rows = self._query(f"id == {int(entry_id)}", ["sha256"], 1)
        if not rows:
            return False
        self.client.delete(self.collection, ids=[int(entry_id)])
        sha = str(rows[0]["sha256"])
        if _HEX_RE.fullmatch(sha) and not self._query(f"sha256 == {milvus_literal(sha)}", ["id"], 1):
            self.images.delete(sha)
        return True

    def update(self, entry_id: int, label: str | None = None, metadata: dict[str, Any] | None = None) -> Entry | None:
        rows = self._query(f"id == {int(entry_id)}", [*FIELDS, "vector"], 1)
        if not rows:
            return None
        row = dict(rows[0])
        row["label"] = row["label"] if label is None else label
        row["metadata"] = row["metadata"] if metadata is None else metadata
        row["vector"] = [float(x) for x in row["vector"]]
        self.client.upsert(self.collection, [row])
        return _entry(row)

    # -- reads ---------------------------------------------------------------------------------------
    def entries(self, ids: Sequence[int]) -> dict[int, Entry]:
        wanted = id_list(ids)
        if not wanted:
            return {}
        return {int(r["id"]): _entry(r) for r in self._query(f"id in {json.dumps(wanted)}", FIELDS)}

    def image(self, entry_id: int) -> tuple[bytes, str | None] | None:
        entry = self.get(entry_id)
        data = None if entry is None else self.images.get(entry.sha256)
        return None if entry is None or data is None else (data, entry.media_type)

    def _ids(self, label: str | None) -> list[int]:
        expr = "id >= 0" if label is None else f"label == {milvus_literal(label)}"
        return sorted(int(r["id"]) for r in self._query(expr, ["id"]))

    def list(self, label: str | None = None, offset: int = 0, limit: int = 100) -> list[Entry]:
        page = self._ids(label)[int(offset) : int(offset) + int(limit)]
        found = self.entries(page)
        return [found[i] for i in page if i in found]

    def count(self, label: str | None = None) -> int:
        expr = "" if label is None else f"label == {milvus_literal(label)}"
        return int(self.client.query(self.collection, filter=expr, output_fields=["count(*)"])[0]["count(*)"])

    def labels(self) -> dict[str, int]:
        return dict(sorted(Counter(str(r["label"]) for r in self._query("id >= 0", ["label"])).items()))

    def search(self, query: np.ndarray, k: int, where: Filter | None = None) -> Neighbours:
        q = check_vector(query, self.spec)
        metric = "IP" if self.spec.metric == "cosine" else "L2"
        found = self.client.search(
            self.collection,
            data=[q.tolist()],
            limit=int(k),
            filter=milvus_expression(where) if where is not None else "",
            search_params={"metric_type": metric},
            output_fields=[],
        )[0]
        out = [(int(h["id"]), float(h["distance"])) for h in found]
        if self.spec.metric == "euclidean":
            out = [(i, float(np.sqrt(max(d, 0.0)))) for i, d in out]
        return out

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        rows = sorted(self._query("id >= 0", ["id", "vector"]), key=lambda r: int(r["id"]))
        ids = np.array([int(r["id"]) for r in rows], dtype=np.int64)
        return ids, np.array([r["vector"] for r in rows], dtype=np.float32).reshape(len(rows), self.spec.dim)

    def close(self) -> None:
        self.images.close()
        self.client.close()


@STORES.register("milvus")
def _open_milvus(location: str, spec: StoreSpec | None, import_from: Path | None) -> GalleryStore:
    return MilvusStore(location, spec, import_from)
