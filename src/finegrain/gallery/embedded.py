"""The ``embedded`` gallery store: SQLite (WAL mode) is the ledger of record, FAISS the search structure.

```
STORE/
  gallery.sqlite   entries (id, label, metadata, sha256, media type, vector), the images by sha256,
                   a log of adds and removes, and the store's spec (dim, metric, model)
  index.faiss      a snapshot of the FAISS index (a cache: the ledger's last change it holds in
                   its header, a CRC of its bytes); never trusted over the ledger
```

Every write is one SQLite transaction (``synchronous=FULL``): when it returns, it is on disk, and a
kill at any moment leaves it whole or absent. The in-memory FAISS index (exact, ``IndexIDMap2``
over a flat index) is built from the ledger on open and kept up to date from the change log before
every read, so writes made by another process (``finegrain gallery add`` beside a running server)
are seen by the next search. A file SQLite finds damaged is refused, never replaced.

Opening loads the snapshot and replays only the changes logged after it; a snapshot that is absent,
damaged, of another store or ahead of the ledger is ignored (the index is rebuilt from the ledger)
and written again. It is written when a store whose snapshot is behind is closed, and in the
background after an open that replayed many changes (a server that is always killed still gets one).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import uuid
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.errors import FinegrainError
from finegrain.faiss_import import import_faiss
from finegrain.gallery.filters import Filter
from finegrain.gallery.importer import import_index
from finegrain.gallery.store import (
    METRICS,
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
from finegrain.runs import atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

DB_FILE = "gallery.sqlite"
SNAPSHOT_FILE = "index.faiss"
SNAPSHOT_MAGIC = b"finegrain-faiss-snapshot-1\n"
SNAPSHOT_AFTER = 10_000
"""An open that replays more changes than this after the snapshot writes a new one (in the background)."""
FORMAT = "finegrain-gallery-1"
BUSY_TIMEOUT_S = 30.0
MMAP_BYTES = 2**36  # SQLite caps it at its compiled maximum
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  label TEXT NOT NULL,
  metadata TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  media_type TEXT,
  added_at TEXT NOT NULL,
  vector BLOB NOT NULL
);
CREATE INDEX entries_label ON entries (label);
CREATE INDEX entries_sha256 ON entries (sha256);
CREATE TABLE images (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, id INTEGER NOT NULL, op TEXT NOT NULL);
"""
ENTRY_COLUMNS = "id, label, metadata, sha256, media_type, added_at"
_JSON_TYPES = {str: ("text",), int: ("integer",), float: ("integer", "real")}


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
    conn.execute(f"PRAGMA mmap_size={MMAP_BYTES}")  # reads (the vectors at open) without copies: half the time
    return conn


def _damaged(db: Path, why: object) -> FinegrainError:
    return FinegrainError(
        f"damaged gallery store {db}: {why}; restore it from a backup (a damaged store is never emptied or replaced)"
    )


def _entry(row: tuple) -> Entry:
    return Entry(
        id=int(row[0]), label=row[1], metadata=json.loads(row[2]), sha256=row[3], media_type=row[4], added_at=row[5]
    )


class EmbeddedStore(StoreBase):
    """A gallery store in one SQLite file, searched through an exact FAISS index kept in memory."""

    def __init__(self, folder: str | Path, spec: StoreSpec | None = None, import_from: Path | None = None) -> None:
        self.folder = Path(folder)
        self.location = str(self.folder)
        self.db = self.folder / DB_FILE
        if not self.db.is_file():
            self._create(spec, import_from)
        try:
            self._read = _connect(self.db)
            self._write = _connect(self.db)
            self.spec = self._check()
        except sqlite3.DatabaseError as e:
            raise _damaged(self.db, e) from None
        self._write_lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._load()

    # -- creating and checking -------------------------------------------------------------------
    def _create(self, spec: StoreSpec | None, import_from: Path | None) -> None:
        if spec is None:
            raise FinegrainError(
                f"no gallery store in {self.folder} (serve the run, or add images with "
                "`finegrain gallery add RUN PATH`, to create it)"
            )
        if spec.metric not in METRICS:
            raise FinegrainError(f"unknown metric {spec.metric!r}; valid: {', '.join(METRICS)}")
        if self.folder.is_dir() and any(not p.name.startswith(".") for p in self.folder.iterdir()):
            raise FinegrainError(
                f"{self.folder} holds files but no {DB_FILE}: not a gallery store (choose an empty or new folder)"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(f".{DB_FILE}.*.tmp*"):  # a creation that was killed
            stale.unlink(missing_ok=True)
        tmp = self.folder / f".{DB_FILE}.{uuid.uuid4().hex[:8]}.tmp"
        conn = _connect(tmp)
        try:
            conn.executescript(SCHEMA)
            conn.execute("BEGIN")
            meta = {
                "format": FORMAT,
                "dim": str(spec.dim),
                "metric": spec.metric,
                "model_checksum": spec.model_checksum,
                "class_names": json.dumps(spec.class_names),
                "created_at": now_iso(),
                "store_id": uuid.uuid4().hex,  # what a snapshot must name to be this store's
            }
            if import_from is not None:
                meta["imported_from"] = str(import_from)
                import_index(conn, import_from, spec)
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", sorted(meta.items()))
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        try:  # a link never replaces a store another process created meanwhile
            os.link(tmp, self.db)
        except FileExistsError:
            log.info("another process created %s first; using it", self.db)
        finally:
            tmp.unlink(missing_ok=True)
            for side in self.folder.glob(f"{tmp.name}-*"):
                side.unlink(missing_ok=True)
        fsync_dir(self.folder)

    def _check(self) -> StoreSpec:
        """The store's spec, once SQLite's own check and ours pass."""
        problems = [r[0] for r in self._read.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise _damaged(self.db, "; ".join(map(str, problems[:3])))
        try:
            meta = dict(self._read.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
            self._identity = str(meta.get("store_id") or meta.get("created_at"))
            return StoreSpec(
                dim=int(meta["dim"]),
                metric=meta["metric"],
                model_checksum=meta["model_checksum"],
                class_names=json.loads(meta.get("class_names") or "null"),
            )
        except (KeyError, ValueError, sqlite3.DatabaseError) as e:
            raise _damaged(self.db, e) from None

    # -- the in-memory index ---------------------------------------------------------------------
    def _load(self) -> None:
        self._open_index()
        with self._index_lock:
            snapshot_seq = self._seq
            self._sync()
            entries = int(self._read.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
            if self.loaded_from == "snapshot":  # the rows the snapshot stands for are still whole
                bad = self._read.execute(
                    "SELECT id FROM entries WHERE typeof(vector) != 'blob' OR length(vector) != ? LIMIT 1",
                    (self.spec.dim * 4,),
                ).fetchone()
                if bad is not None:
                    raise _damaged(self.db, f"a vector of the wrong size (entry {bad[0]})")
            if self.loaded_from == "snapshot" and int(self._index.ntotal) != entries:
                log.warning("%s does not match %s: rebuilt from the ledger", self._snapshot_path, self.db)
                self._rebuild()
                snapshot_seq = -1
        self._snapshot_seq = snapshot_seq if self.loaded_from == "snapshot" else -1
        replayed = self._seq - snapshot_seq if self.loaded_from == "snapshot" else entries
        self._writer: threading.Thread | None = None
        if replayed > SNAPSHOT_AFTER:
            self._writer = threading.Thread(target=self._snapshot_quietly, name="gallery-snapshot", daemon=True)
            self._writer.start()

    def _open_index(self) -> None:
        """The index from the snapshot if it can be trusted, else from the ledger (not yet caught up)."""
        self._snapshot_path = self.folder / SNAPSHOT_FILE
        loaded = self._read_snapshot()
        if loaded is None:
            self._rebuild()
            return
        self._index, self._seq = loaded
        faiss = import_faiss()
        self._present: set[int] = set(faiss.vector_to_array(self._index.id_map).tolist())
        self.loaded_from = "snapshot"

    def _rebuild(self) -> None:
        faiss = import_faiss()
        flat = faiss.IndexFlatIP(self.spec.dim) if self.spec.metric == "cosine" else faiss.IndexFlatL2(self.spec.dim)
        self._index = faiss.IndexIDMap2(flat)
        self._present = set()
        self.loaded_from = "ledger"
        with self._snapshot() as c:
            self._seq = int(c.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])
            self._add_rows(c.execute("SELECT id, vector FROM entries").fetchall())

    def _snapshot_header(self) -> dict[str, Any]:
        return {"store": self._identity, "dim": self.spec.dim, "metric": self.spec.metric}

    def _read_snapshot(self) -> tuple[Any, int] | None:
        """(index, the last change it holds) from the snapshot, or None (absent, or not to be trusted: said)."""
        try:
            data = self._snapshot_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read %s (%s): rebuilding the index from the ledger", self._snapshot_path, e)
            return None
        try:
            if not data.startswith(SNAPSHOT_MAGIC):
                raise ValueError("not a finegrain snapshot")
            at = len(SNAPSHOT_MAGIC)
            size = int.from_bytes(data[at : at + 8], "little")
            header = json.loads(data[at + 8 : at + 8 + size])
            body = memoryview(data)[at + 8 + size :]
            if {k: header.get(k) for k in ("store", "dim", "metric")} != self._snapshot_header():
                raise ValueError("made for another store")
            if len(body) != header["bytes"] or zlib.crc32(body) != header["crc32"]:
                raise ValueError("damaged (its CRC does not match)")
            seq = int(header["seq"])
            row = self._read.execute("SELECT id, op FROM changes WHERE seq = ?", (seq,)).fetchone()
            if seq and (row is None or [int(row[0]), row[1]] != header["change"]):
                raise ValueError(f"its last change ({seq}) is not the ledger's")
            faiss = import_faiss()
            index = faiss.deserialize_index(np.frombuffer(body, dtype=np.uint8))
            if index.d != self.spec.dim or int(index.ntotal) != int(header["count"]):
                raise ValueError("its index is not the one described")
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            log.warning("ignoring %s (%s): rebuilding the index from the ledger", self._snapshot_path, e)
            return None
        return index, seq

    def write_snapshot(self) -> Path:
        """Write the index, caught up with the ledger, as the store's snapshot (atomically)."""
        faiss = import_faiss()
        with self._index_lock:
            self._sync()
            body = faiss.serialize_index(self._index).tobytes()
            seq, count = self._seq, int(self._index.ntotal)
            row = self._read.execute("SELECT id, op FROM changes WHERE seq = ?", (seq,)).fetchone()
        header = {
            **self._snapshot_header(),
            "seq": seq,
            "change": None if row is None else [int(row[0]), row[1]],
            "count": count,
            "bytes": len(body),
            "crc32": zlib.crc32(body),
        }
        text = json.dumps(header).encode()
        atomic_write_bytes(self._snapshot_path, SNAPSHOT_MAGIC + len(text).to_bytes(8, "little") + text + body)
        self._snapshot_seq = seq
        return self._snapshot_path

    def _snapshot_quietly(self) -> None:
        try:
            self.write_snapshot()
        except (OSError, FinegrainError, sqlite3.Error) as e:  # a cache: the ledger is still whole
            log.warning("could not write %s: %s", self._snapshot_path, e)

    def _add_rows(self, rows: list[tuple[int, bytes]]) -> None:
        if not rows:
            return
        width = self.spec.dim * 4
        bad = [r[0] for r in rows if not isinstance(r[1], bytes) or len(r[1]) != width]
        if bad:
            raise _damaged(self.db, f"{len(bad)} vector(s) of the wrong size (entry {bad[0]})")
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        x = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.spec.dim)
        self._index.add_with_ids(x, ids)
        self._present.update(ids.tolist())

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query in it sees the same committed state."""
        self._read.execute("BEGIN")
        try:
            yield self._read
        finally:
            self._read.execute("COMMIT")

    def _sync(self) -> None:
        """Apply the adds and removes committed since the index last looked (ours or another process's)."""
        top = int(self._read.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])
        if top <= self._seq:
            return
        with self._snapshot() as c:
            changes = c.execute("SELECT seq, id, op FROM changes WHERE seq > ? ORDER BY seq", (self._seq,)).fetchall()
            removed = {int(i) for _, i, op in changes if op == "remove"}
            added = {int(i) for _, i, op in changes if op == "add"} - removed - self._present
            gone = sorted(removed & self._present)
            if gone:
                self._index.remove_ids(np.array(gone, dtype=np.int64))
                self._present.difference_update(gone)
            rows: list[tuple[int, bytes]] = []
            todo = sorted(added)
            for start in range(0, len(todo), 500):
                chunk = todo[start : start + 500]
                rows += c.execute(
                    f"SELECT id, vector FROM entries WHERE id IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall()
            self._add_rows(rows)
            self._seq = max(int(s) for s, _, _ in changes)

    def refresh(self) -> None:
        """Catch up with every write committed so far (done before each read anyway)."""
        with self._index_lock:
            self._sync()

    # -- writes ----------------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock:
            self._write.execute("BEGIN IMMEDIATE")  # waits for another process's write to finish
            try:
                yield self._write
            except BaseException:
                self._write.execute("ROLLBACK")
                raise
            self._write.execute("COMMIT")

    def add(self, entries: Sequence[NewEntry]) -> list[int]:
        rows = [(e, check_vector(e.vector, self.spec), e.sha256) for e in entries]
        ids: list[int] = []
        with self._transaction() as c:
            for e, v, sha in rows:
                found = c.execute("SELECT id FROM entries WHERE sha256 = ? ORDER BY id LIMIT 1", (sha,)).fetchone()
                if found:
                    ids.append(int(found[0]))
                    continue
                c.execute("INSERT OR IGNORE INTO images (sha256, data) VALUES (?, ?)", (sha, e.image))
                cur = c.execute(
                    "INSERT INTO entries (label, metadata, sha256, media_type, added_at, vector) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (e.label, json.dumps(e.metadata), sha, e.media_type, now_iso(), v.tobytes()),
                )
                new_id = int(cur.lastrowid or 0)
                c.execute("INSERT INTO changes (id, op) VALUES (?, 'add')", (new_id,))
                ids.append(new_id)
        self.refresh()
        return ids

    def add_vectors(self, vectors: np.ndarray, labels: Sequence[str]) -> list[int]:
        """Add bare vectors (no image; for benchmarks and imports of vectors made elsewhere)."""
        x = np.asarray(vectors, dtype=np.float32)
        ids: list[int] = []
        with self._transaction() as c:
            for v, label in zip(x, labels, strict=True):
                vec = check_vector(v, self.spec)
                cur = c.execute(
                    "INSERT INTO entries (label, metadata, sha256, media_type, added_at, vector) "
                    "VALUES (?, '{}', ?, NULL, ?, ?)",
                    (label, "vector-" + uuid.uuid4().hex, now_iso(), vec.tobytes()),
                )
                ids.append(int(cur.lastrowid or 0))
            c.executemany("INSERT INTO changes (id, op) VALUES (?, 'add')", [(i,) for i in ids])
        self.refresh()
        return ids

    def remove(self, entry_id: int) -> bool:
        with self._transaction() as c:
            row = c.execute("SELECT sha256 FROM entries WHERE id = ?", (int(entry_id),)).fetchone()
            if row is None:
                return False
            c.execute("DELETE FROM entries WHERE id = ?", (int(entry_id),))
            c.execute(
                "DELETE FROM images WHERE sha256 = ? AND NOT EXISTS (SELECT 1 FROM entries WHERE sha256 = ?)",
                (row[0], row[0]),
            )
            c.execute("INSERT INTO changes (id, op) VALUES (?, 'remove')", (int(entry_id),))
        self.refresh()
        return True

    def update(self, entry_id: int, label: str | None = None, metadata: dict[str, Any] | None = None) -> Entry | None:
        with self._transaction() as c:
            if label is not None:
                c.execute("UPDATE entries SET label = ? WHERE id = ?", (label, int(entry_id)))
            if metadata is not None:
                c.execute("UPDATE entries SET metadata = ? WHERE id = ?", (json.dumps(metadata), int(entry_id)))
        return self.get(entry_id)

    # -- reads -----------------------------------------------------------------------------------
    def entries(self, ids: Sequence[int]) -> dict[int, Entry]:
        """The entries of ``ids`` that exist, by id."""
        wanted = id_list(ids)
        if not wanted:
            return {}
        with self._index_lock:
            rows = self._read.execute(
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE id IN ({','.join('?' * len(wanted))})", wanted
            ).fetchall()
        return {int(r[0]): _entry(r) for r in rows}

    def image(self, entry_id: int) -> tuple[bytes, str | None] | None:
        with self._index_lock:
            row = self._read.execute(
                "SELECT i.data, e.media_type FROM entries e JOIN images i ON i.sha256 = e.sha256 WHERE e.id = ?",
                (int(entry_id),),
            ).fetchone()
        return None if row is None else (bytes(row[0]), row[1])

    def list(self, label: str | None = None, offset: int = 0, limit: int = 100) -> list[Entry]:
        where, args = ("WHERE label = ?", [label]) if label is not None else ("", [])
        with self._index_lock:
            rows = self._read.execute(
                f"SELECT {ENTRY_COLUMNS} FROM entries {where} ORDER BY id LIMIT ? OFFSET ?",
                [*args, int(limit), int(offset)],
            ).fetchall()
        return [_entry(r) for r in rows]

    def count(self, label: str | None = None) -> int:
        where, args = ("WHERE label = ?", [label]) if label is not None else ("", [])
        with self._index_lock:
            if label is None:  # the index, caught up with the ledger, holds exactly its entries
                self._sync()
                return int(self._index.ntotal)
            return int(self._read.execute(f"SELECT COUNT(*) FROM entries {where}", args).fetchone()[0])

    def labels(self) -> dict[str, int]:
        """Entries per label."""
        with self._index_lock:
            rows = self._read.execute("SELECT label, COUNT(*) FROM entries GROUP BY label ORDER BY label").fetchall()
        return {str(label): int(n) for label, n in rows}

    def _matching_ids(self, where: Filter) -> np.ndarray:
        key = where.metadata_key
        if key is None:
            rows = self._read.execute("SELECT id FROM entries WHERE label = ?", (where.value,)).fetchall()
        else:
            path = f'$."{key}"'  # key is a checked identifier; it is still bound, never pasted
            if isinstance(where.value, bool):
                rows = self._read.execute(
                    "SELECT id FROM entries WHERE json_type(metadata, ?) = ?",
                    (path, "true" if where.value else "false"),
                ).fetchall()
            else:
                types = _JSON_TYPES[type(where.value)]
                rows = self._read.execute(
                    f"SELECT id FROM entries WHERE json_type(metadata, ?) IN ({','.join('?' * len(types))}) "
                    "AND json_extract(metadata, ?) = ?",
                    (path, *types, path, where.value),
                ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def search(self, query: np.ndarray, k: int, where: Filter | None = None) -> Neighbours:
        faiss = import_faiss()
        q = check_vector(query, self.spec)[None, :]
        with self._index_lock:
            self._sync()
            params = None
            if where is not None:
                ids = self._matching_ids(where)
                if len(ids) == 0:
                    return []
                params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids))
            k = min(int(k), int(self._index.ntotal))
            if k < 1:
                return []
            # pytorch-metric-learning imports faiss.contrib.torch_utils, whose Index.search takes no
            # params: call the numpy search it keeps aside when it is there
            search = getattr(self._index, "search_numpy", self._index.search)
            scores, found = search(q, k, params=params)
        if self.spec.metric == "euclidean":
            scores = np.sqrt(np.maximum(scores, 0.0))
        return [(int(i), float(s)) for s, i in zip(scores[0], found[0], strict=True) if i >= 0]

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        with self._index_lock:
            rows = self._read.execute("SELECT id, vector FROM entries ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        x = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.spec.dim)
        return ids, x

    @property
    def indexed(self) -> int:
        """Vectors in the in-memory index (equals :meth:`count` once it has caught up)."""
        with self._index_lock:
            return int(self._index.ntotal)

    def close(self) -> None:
        """Write the snapshot if it is behind the ledger, and close the connections."""
        if self._writer is not None:
            self._writer.join()
        with self._index_lock:
            self._sync()
            behind = self._seq != self._snapshot_seq and self._index.ntotal > 0
        if behind:
            self._snapshot_quietly()
        for conn in (self._read, self._write):
            conn.close()


@STORES.register("embedded")
def _open_embedded(location: str, spec: StoreSpec | None, import_from: Path | None) -> GalleryStore:
    return EmbeddedStore(location, spec, import_from)
