"""The ``ivfpq`` index kind, for 10^6-10^8 vectors on one server: IVF with PQ (or OPQ+PQ) codes in
RAM and an exact re-rank of the best candidates from every vector kept in float16 on disk.

```
index/
  index.faiss      the IVF-PQ index (FAISS): about ``m`` bytes of code + 8 of id a vector
  lists.ivfdata    on-disk lists only: the codes and ids, memory-mapped (index.faiss then holds
                   the quantizers and where each list lies in this file)
  vectors.f16.npy  every vector in float16: a query reads only its candidates' rows, with plain
                   reads (:func:`read_rows`), so the copy lives in the page cache, not in RSS
  labels.npy, paths.json, meta.json   as for every kind
```

A search scans ``nprobe`` inverted lists with the PQ codes, keeps the best
:data:`RERANK_CANDIDATES` (at least ``k``), and orders them by their exact score computed from the
stored vectors, so the scores returned are the same as a flat index's (up to float16 rounding).

Building never needs every vector in RAM: :func:`build_ivfpq` trains on a random sample of the
stream of chunks, then adds it chunk by chunk, writing the float16 vectors as they come. ``nlist``,
the code size and ``nprobe`` follow from the gallery size and a recall target: the smallest
``nprobe`` reaching it on held-out queries (gallery vectors whose own entry is left out of both
answers) is kept, and the recall measured is written into the metadata.

The codes are added in shards of at most :data:`SHARD_BYTES`, each filled in RAM and written as a
FAISS index once full. Where the codes would exceed a memory budget (``max_ram``, half of this
machine's RAM unless given), or on request, the inverted lists live on disk (FAISS
``OnDiskInvertedLists``): the shards are merged on disk into ``lists.ivfdata``
(``faiss.contrib.ondisk.merge_ondisk``), which searches memory-map. Otherwise they are gathered
into lists in RAM, each allocated once at its final size. ``params["lists"]`` says which
(``in-ram`` or ``on-disk``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from finegrain.errors import FinegrainError
from finegrain.faiss_import import import_faiss
from finegrain.retrieval.index import (
    INDEX_KINDS,
    INDEX_OPENERS,
    INDEX_READ_FLAGS,
    KIND_FILES,
    RECALL_K,
    RECALL_QUERIES,
    faiss_metric,
    recall_at_k,
)
from finegrain.retrieval.index_files import REBUILD

log = logging.getLogger(__name__)

KIND = "ivfpq"
VECTORS_FILE = "vectors.f16.npy"
LISTS_FILE = "lists.ivfdata"
IN_RAM, ON_DISK = "in-ram", "on-disk"
ID_BYTES = 8
SHARD_BYTES = 256 * 2**20
"""Codes (and ids) a shard holds in RAM before it is written (less when the memory budget is
smaller)."""
RAM_SHARDS, MIN_RAM_SHARD_BYTES = 8, 16 * 2**20
"""In-RAM lists are gathered from shards of about an eighth of them (at least 16 MB): the shard read
back while gathering adds at most that to the final lists."""
DIGEST_BLOCKS, DIGEST_BLOCK = 64, 2**20
DEFAULT_RECALL = 0.95
RERANK_CANDIDATES = 100
"""PQ candidates re-ranked exactly per query (``k`` when more are asked); doubled, up to
:data:`MAX_RERANK`, when scanning every list does not reach the recall target."""
MAX_RERANK = 800
RERANK_BEFORE_PROBE = 400
"""Candidates re-ranked before tuning scans more lists: a query's neighbours often lie in the lists
it scans already but among near variants their codes rank too coarsely (at 10^7 generated
vectors nprobe 4 with 400 re-ranked reached recall@10 0.994 in 1.8 ms; scanning every list with
200, 0.975 in 45 ms)."""
TRAIN_POINTS_PER_LIST = 50
PQ_TRAIN_POINTS = 256 * 39  # 8-bit codebooks: FAISS wants 39 points per centroid
HNSW_QUANTIZER_FROM = 1024
"""From this many lists the coarse quantizer is an HNSW graph of the centroids: assigning 10^7
vectors to 4,096 centroids by brute force alone takes a core a quarter of an hour."""
STREAM_CHUNK = 16384
KMEANS_NITER = 10
TUNE_WORK = 10**9
"""Held-out queries times gallery vectors that tuning compares exactly: 1,000 queries up to 10^6
vectors, fewer beyond (at least 200), as each one costs a pass over every vector."""
SEARCH_BLOCK = 64
READ_GAP_ROWS = 8
"""Rows between two wanted ones that :func:`read_rows` reads rather than start another read."""
BUILD_PHASES = ("sample", "train", "add", "seal", "tune")
"""What :func:`build_ivfpq` does in turn: a pass for the training sample, training, a pass adding
every chunk, closing the float16 copy and putting the shards' lists together (gathered in RAM or
merged on disk), tuning ``nprobe``."""

KIND_FILES.update((VECTORS_FILE, LISTS_FILE))


def machine_ram() -> int:
    """This machine's physical memory in bytes (0 where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def lists_bytes(n: int, m: int) -> int:
    """RAM the inverted lists of ``n`` vectors take: ``m`` code bytes and an int64 id each."""
    return n * (m + ID_BYTES)


def ivfpq_params(
    n: int,
    dim: int,
    recall: float = DEFAULT_RECALL,
    opq: bool = False,
    max_ram: int | None = None,
    on_disk: bool = False,
) -> dict:
    """``nlist`` (a power of two near sqrt(n), at least 39 training points each), PQ code bytes
    ``m`` (dim/8 for a recall target of 0.9 or more, else dim/16, a divisor of dim), bits per
    code (8, fewer for galleries too small to train 256 centroids a sub-space), and where the
    lists live: on disk when asked (``on_disk``) or when they would exceed ``max_ram`` bytes
    (default: half of this machine's RAM)."""
    if not 0 < recall <= 1:
        raise FinegrainError(f"--recall must be in (0, 1]; got {recall}")
    if max_ram is not None and max_ram <= 0:
        raise FinegrainError(f"--max-ram must be positive; got {max_ram / 2**30:g} GB")
    nlist = 1 << max(0, round(math.log2(max(1.0, math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39))
    wanted = max(1, dim // (8 if recall >= 0.9 else 16))
    m = max(d for d in range(1, wanted + 1) if dim % d == 0)
    nbits = int(max(1, min(8, math.floor(math.log2(max(2, n // 39))))))
    budget = max_ram if max_ram is not None else machine_ram() // 2
    codes = lists_bytes(n, m)
    return {
        "nlist": nlist,
        "m": m,
        "nbits": nbits,
        "opq": bool(opq),
        "recall_target": recall,
        "rerank": RERANK_CANDIDATES,
        "train_points": min(n, max(nlist * TRAIN_POINTS_PER_LIST, PQ_TRAIN_POINTS)),
        "lists": ON_DISK if on_disk or (budget > 0 and codes > budget) else IN_RAM,
        "max_ram": budget,
    }


def _factory(dim: int, params: dict) -> str:
    quantizer = "_HNSW32" if params["nlist"] >= HNSW_QUANTIZER_FROM else ""
    opq = f"OPQ{params['m']}," if params["opq"] else ""
    # np: no polysemous training (slow, unused)
    return f"{opq}IVF{params['nlist']}{quantizer},PQ{params['m']}x{params['nbits']}np"


def _top(scores: np.ndarray, ids: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each row (highest inner product, lowest squared L2); missing ids last."""
    key = -scores if metric == "cosine" else scores.copy()
    key[ids < 0] = np.inf
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def streaming_knn(
    queries: np.ndarray, chunks: Iterable[np.ndarray], k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Exact neighbours of ``queries`` over a stream of base chunks (ids count rows across them),
    holding one chunk at a time: (faiss scores, ids) as :func:`exact_neighbours` gives them."""
    faiss = import_faiss()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(q), k, keep_max=metric == "cosine")
    start = 0
    for chunk in chunks:
        base = np.ascontiguousarray(chunk, dtype=np.float32)
        d, i = faiss.knn(q, base, min(k, len(base)), metric=faiss_metric(metric))
        heap.add_result(d, np.where(i >= 0, i + start, -1))
        start += len(base)
    heap.finalize()
    return heap.D, heap.I


def rows(array: np.ndarray, chunk: int = STREAM_CHUNK) -> Iterator[np.ndarray]:
    """``array`` in float32 chunks of ``chunk`` rows; a memory map is read with plain reads, so
    streaming a file larger than RAM leaves none of it mapped in this process."""
    if not isinstance(array, np.memmap) or array.filename is None:
        for s in range(0, len(array), chunk):
            yield np.asarray(array[s : s + chunk], dtype=np.float32)
        return
    width = array.shape[1] * array.dtype.itemsize
    with open(array.filename, "rb") as f:
        for s in range(0, len(array), chunk):
            f.seek(array.offset + s * width)
            n = min(chunk, len(array) - s)
            yield np.frombuffer(f.read(n * width), dtype=array.dtype).reshape(n, -1).astype(np.float32)


def read_rows(array: np.ndarray, ids: np.ndarray, file: BinaryIO | None = None) -> np.ndarray:
    """Rows ``ids`` of ``array`` in float32. A memory map is read (from ``file`` if given, open on
    the same file, else from its name) with plain reads, one a run of
    nearby rows (gaps up to :data:`READ_GAP_ROWS`), so that no page of the file stays mapped in this
    process: a re-rank's reads then live in the page cache, shared and reclaimable, not in the
    resident memory of every process that searches (reading through the map left every page it
    touched, and the pages around it, resident until the map closed)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if not isinstance(array, np.memmap) or array.filename is None or not len(ids):
        return np.asarray(array[ids], dtype=np.float32)
    uniq, inverse = np.unique(ids, return_inverse=True)
    if len(uniq) and (uniq[0] < 0 or uniq[-1] >= len(array)):
        raise FinegrainError(f"no row {uniq[0] if uniq[0] < 0 else uniq[-1]} in {array.filename} ({len(array)} rows)")
    cut = np.flatnonzero(np.diff(uniq) > READ_GAP_ROWS) + 1
    first, last = uniq[np.r_[0, cut]], uniq[np.r_[cut, len(uniq)] - 1]
    at = np.r_[0, np.cumsum(last - first + 1)]  # where each run starts in the block read
    block = np.empty((int(at[-1]), *array.shape[1:]), dtype=array.dtype)
    width = block[:1].nbytes
    buf = block.view(np.uint8).reshape(-1).data
    f = file if file is not None else open(array.filename, "rb", buffering=0)  # noqa: SIM115
    try:
        fd = f.fileno()
        starts, ends, offsets = (at[:-1] * width).tolist(), (at[1:] * width).tolist(), array.offset + first * width
        for a, b, offset in zip(starts, ends, offsets.tolist(), strict=True):
            if os.preadv(fd, [buf[a:b]], offset) != b - a:
                raise FinegrainError(f"damaged index file {array.filename}: shorter than its {len(array)} rows")
    finally:
        if file is None:
            f.close()
    run = np.repeat(np.arange(len(first)), np.diff(np.r_[0, cut, len(uniq)]))
    return block[(at[run] + uniq - first[run])[inverse]].astype(np.float32)


class RerankedIVFPQ:
    """An IVF-PQ FAISS index whose candidates are re-ranked with the exact vectors (float16).

    It answers as a FAISS index does (``d``, ``ntotal``, ``is_trained``, ``train``, ``add``,
    ``search``), so :class:`~finegrain.retrieval.index.GalleryIndex` holds it like any other kind.
    """

    def __init__(
        self,
        ivf: Any,
        metric: str,
        params: dict,
        vectors: np.ndarray | None = None,
        vectors_file: Path | None = None,
        n: int | None = None,
        lists_dir: Path | None = None,
    ) -> None:
        self.ivf = ivf
        self.metric = metric
        self.params = params
        self._reader: BinaryIO | None = None
        self.vectors = vectors  # [ntotal, d] float16 once built or opened
        self._file = vectors_file
        self._parts: list[np.ndarray] = []
        self._n = n
        self._out: Any = None
        if vectors is None and vectors_file is not None:  # written with plain writes: no page stays mapped
            if n is None:
                raise ValueError("a vectors file needs the number of vectors")
            self._out = open(vectors_file, "wb")  # noqa: SIM115 - closed by finish()
            np.lib.format.write_array_header_1_0(
                self._out, {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": (n, int(ivf.d))}
            )
        self._filled = 0
        # on-disk lists: shards written into lists_dir, merged into one file there by _seal()
        self._lists_dir = lists_dir
        self._trained: Any = None  # the trained, empty FAISS index every shard starts from
        self._shard: Any = None
        self._shards: list[Path] = []
        self._shard_sizes: list[np.ndarray] = []  # each written shard's list sizes
        self._lists_file: Path | None = None  # the merged lists while they are the build's own
        self.set_nprobe(int(params.get("nprobe", 1)))

    @classmethod
    def empty(
        cls,
        dim: int,
        metric: str,
        params: dict,
        vectors_file: Path | None = None,
        n: int | None = None,
        lists_dir: Path | None = None,
    ) -> RerankedIVFPQ:
        """An untrained index of ``params`` (:func:`ivfpq_params`); on-disk lists are built in
        ``lists_dir`` (a new temporary folder if none)."""
        faiss = import_faiss()
        ivf = faiss.index_factory(dim, _factory(dim, params), faiss_metric(metric))
        ivf_part = faiss.extract_index_ivf(ivf)
        ivf_part.cp.min_points_per_centroid = 1  # small galleries: nlist is already capped by n / 39
        ivf_part.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        ivf_part.cp.niter = KMEANS_NITER
        return cls(ivf, metric, dict(params), vectors_file=vectors_file, n=n, lists_dir=lists_dir)

    @property
    def vectors(self) -> np.ndarray | None:
        """The float16 copy: in RAM, or memory-mapped and read with :attr:`_reader` (open from the
        moment it is mapped, so it follows the file when a save moves it)."""
        return self._vectors

    @vectors.setter
    def vectors(self, vectors: np.ndarray | None) -> None:
        self._vectors = vectors
        if self._reader is not None:
            self._reader.close()
        mapped = isinstance(vectors, np.memmap) and vectors.filename is not None
        self._reader = open(vectors.filename, "rb", buffering=0) if mapped else None  # type: ignore[union-attr,assignment]  # noqa: SIM115

    # -- what a FAISS index answers --------------------------------------------------
    @property
    def d(self) -> int:
        return int(self.ivf.d)

    @property
    def ntotal(self) -> int:
        return max(int(self.ivf.ntotal), self._filled)  # on-disk shards count before their merge

    @property
    def on_disk(self) -> bool:
        return self.params.get("lists") == ON_DISK

    @property
    def is_trained(self) -> bool:
        return bool(self.ivf.is_trained)

    def set_nprobe(self, nprobe: int) -> None:
        import_faiss().extract_index_ivf(self.ivf).nprobe = nprobe
        self.params["nprobe"] = nprobe

    def train(self, sample: np.ndarray) -> None:
        self.ivf.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, x: np.ndarray) -> None:
        """Add a chunk (ids continue from the last one), keeping its float16 copy for the re-rank.
        An index is filled once: its shards start from the trained, empty index."""
        if int(self.ivf.ntotal) > 0:
            raise FinegrainError("an ivfpq index is filled once, when it is built: build a new one to add vectors")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._out is not None:
            if self._filled + len(x) > (self._n or 0):
                raise FinegrainError(f"more vectors than the {self._n} announced")
            self._out.write(x.astype(np.float16).tobytes())
        else:
            self._parts.append(x.astype(np.float16))
        self._filled += len(x)
        self._add_to_shard(x, self._filled - len(x))

    def _add_to_shard(self, x: np.ndarray, first_id: int) -> None:
        """Add ``x`` to the shard in RAM, written to a file once it holds its share of codes."""
        faiss = import_faiss()
        if self._trained is None:
            self._trained = faiss.serialize_index(self.ivf)
        code_size = int(faiss.extract_index_ivf(self.ivf).code_size)
        budget = int(self.params.get("max_ram") or 0)  # 0: unknown
        shard_bytes = min(SHARD_BYTES, budget // 4) if budget > 0 else SHARD_BYTES
        if not self.on_disk and self._n:  # gathered into lists in RAM: a shard read back adds little
            shard_bytes = min(shard_bytes, max(MIN_RAM_SHARD_BYTES, lists_bytes(self._n, code_size) // RAM_SHARDS))
        per_shard = max(1, shard_bytes // lists_bytes(1, code_size))
        start = 0
        while start < len(x):
            if self._shard is None:
                self._shard = faiss.deserialize_index(self._trained)
            part = x[start : start + per_shard - int(self._shard.ntotal)]
            ids = np.arange(first_id + start, first_id + start + len(part), dtype=np.int64)
            self._shard.add_with_ids(part, ids)
            start += len(part)
            if self._shard.ntotal >= per_shard:
                self._write_shard()

    def _write_shard(self) -> None:
        if self._shard is None:
            return
        faiss = import_faiss()
        if not self._shards:
            if self._lists_dir is None:
                self._lists_dir = Path(tempfile.mkdtemp(prefix="finegrain-lists-"))
            shutil.rmtree(self._lists_dir, ignore_errors=True)  # a killed build's leftovers
            self._lists_dir.mkdir(parents=True)
        assert self._lists_dir is not None
        path = self._lists_dir / f"shard-{len(self._shards):05d}.faiss"
        faiss.write_index(self._shard, str(path))
        lists = faiss.extract_index_ivf(self._shard).invlists
        self._shard_sizes.append(np.array([lists.list_size(i) for i in range(lists.nlist)], dtype=np.int64))
        self._shards.append(path)
        self._shard = None

    def _seal(self) -> None:
        """Put the shards' lists together: merged on disk into one file, which this index then
        searches, or gathered in RAM (:meth:`_gather`)."""
        if not self._shards and self._shard is None:  # opened, or sealed already
            return
        if not self.on_disk:
            self._gather()
            return
        from faiss.contrib.ondisk import merge_ondisk  # optional dependency (faiss), as import_faiss

        self._write_shard()
        assert self._lists_dir is not None
        lists = self._lists_dir / LISTS_FILE
        with _c_stdout_to_stderr():  # FAISS prints "resizing ..."
            merge_ondisk(self.ivf, [str(p) for p in self._shards], str(lists))
        for p in self._shards:
            p.unlink()
        self._shards, self._trained = [], None
        _on_disk_lists(self.ivf).prefetch_nthread = 0  # see _on_disk_lists
        with open(lists, "rb+") as f:  # the merge wrote through a shared mapping
            os.fsync(f.fileno())
        self._lists_file = lists
        self.params["lists_bytes"] = lists.stat().st_size
        self.params["lists_digest"] = sampled_digest(lists)

    def _gather(self) -> None:
        """The shards' lists into this index's, in RAM, each list allocated once at its final size
        and filled shard by shard, one shard read back at a time. (FAISS growing a list as it adds
        doubles its capacity when full: 10^7 vectors' 0.67 GB of codes and ids took 0.91 GB.)
        A build that never filled a shard takes the one in RAM as it is."""
        faiss = import_faiss()
        ivf = faiss.extract_index_ivf(self.ivf)
        if not self._shards:  # one shard, never written
            shard = faiss.extract_index_ivf(self._shard)
            lists = shard.invlists
            shard.own_invlists = False
        else:
            self._write_shard()
            sizes = np.sum(self._shard_sizes, axis=0)
            lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
            for i in np.flatnonzero(sizes).tolist():
                lists.resize(i, int(sizes[i]))  # from empty: exactly this many
            filled = np.zeros_like(sizes)
            for path, part in zip(self._shards, self._shard_sizes, strict=True):
                shard = faiss.read_index(str(path))
                src = faiss.extract_index_ivf(shard).invlists
                for i in np.flatnonzero(part).tolist():
                    lists.update_entries(i, int(filled[i]), int(part[i]), src.get_ids(i), src.get_codes(i))
                filled += part
                del shard, src
                path.unlink()
            lists.this.disown()
            if self._lists_dir is not None:
                with contextlib.suppress(OSError):
                    self._lists_dir.rmdir()
        ivf.replace_invlists(lists, True)
        ivf.ntotal = self.ivf.ntotal = self._filled
        self._shard, self._shards, self._shard_sizes, self._trained = None, [], [], None

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best of the PQ candidates by exact score: (faiss scores, ids)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        if len(q) > SEARCH_BLOCK:  # bounds the candidates' vectors held at once
            parts = [self.search(q[s : s + SEARCH_BLOCK], k) for s in range(0, len(q), SEARCH_BLOCK)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        vectors = self.sealed_vectors()
        _, cand = self.ivf.search(q, max(k, int(self.params.get("rerank", RERANK_CANDIDATES))))
        if cand.max(initial=-1) >= len(vectors):
            raise FinegrainError(f"damaged index: it names vector {cand.max()}, it holds {len(vectors)}")
        safe = np.where(cand >= 0, cand, 0)
        v = read_rows(vectors, safe, self._reader).reshape(*safe.shape, self.d)
        if self.metric == "cosine":
            scores = np.einsum("qcd,qd->qc", v, q)
        else:
            diff = v - q[:, None]
            scores = np.einsum("qcd,qcd->qc", diff, diff)
        return _top(scores.astype(np.float32), cand, k, self.metric)

    # -- building ---------------------------------------------------------------------
    def sealed_vectors(self) -> np.ndarray:
        """The float16 copy once every vector is added: the lists sealed (:meth:`_seal`), the copy's
        file closed and memory-mapped (or the chunks kept in RAM joined)."""
        self._seal()
        if self._out is not None:  # the last chunk is written: map the file
            if self._filled != self._n:  # np.load would fail on a short file with a bare ValueError
                raise FinegrainError(f"{self._filled} vectors added, {self._n} announced")
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            self._out = None
            self.vectors = np.load(str(self._file), mmap_mode="r")
        if self._parts:
            self.vectors = np.concatenate(([self.vectors] if self.vectors is not None else []) + self._parts)
            self._parts = []
        if self.vectors is None:
            raise FinegrainError("the index holds no vectors yet")
        return self.vectors

    def finish(self) -> dict:
        """After the last :meth:`add`: choose ``nprobe`` for the recall target on held-out
        queries; returns the parameters, with ``measured_recall``."""
        recall, nprobe = tune_nprobe(self, float(self.params.get("recall_target", DEFAULT_RECALL)))
        self.set_nprobe(nprobe)
        self.params["measured_recall"] = recall
        return dict(self.params)

    # -- files --------------------------------------------------------------------------
    def serialize(self) -> bytes:
        self._seal()
        return import_faiss().serialize_index(self.ivf).tobytes()

    def write_files(self, folder: Path) -> dict[str, int]:
        """Put ``vectors.f16.npy`` (and on-disk lists) into ``folder`` (moved when they are the
        build's own files, else copied); returns their sizes in bytes by name."""
        vectors = self.sealed_vectors()
        sizes = self._write_lists(folder) if self.on_disk else {}
        dest = folder / VECTORS_FILE
        if self._file is not None and self._file.is_file():
            os.replace(self._file, dest)  # the open map and reader still read the same file
            self._file = None
        else:
            with open(dest, "wb") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(vectors), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        return {**sizes, VECTORS_FILE: dest.stat().st_size}

    def _write_lists(self, folder: Path) -> dict[str, int]:
        invlists = _on_disk_lists(self.ivf)
        dest = folder / LISTS_FILE
        if self._lists_file is not None:  # the build's own file: moved (the open map still reads it)
            shutil.move(self._lists_file, dest)
            with contextlib.suppress(OSError):
                self._lists_file.parent.rmdir()
            self._lists_file = None
        else:
            shutil.copyfile(invlists.filename, dest)
        with open(dest, "rb+") as f:
            os.fsync(f.fileno())
        invlists.filename = str(dest)
        return {LISTS_FILE: dest.stat().st_size}


def tune_nprobe(index: RerankedIVFPQ, target: float, queries: int | None = None, seed: int = 0) -> tuple[float, int]:
    """The first setting whose recall@10 reaches ``target`` -- re-ranking up to
    :data:`RERANK_BEFORE_PROBE` candidates, then doubling ``nprobe``, then (every list scanned)
    re-ranking up to :data:`MAX_RERANK` -- and the recall it measured, on up to ``queries``
    gallery vectors searched as held-out queries: each one's own entry is dropped from the exact and the
    approximate answers."""
    vectors = index.sealed_vectors()
    n = len(vectors)
    k = min(RECALL_K, n - 1)
    nlist = int(index.params["nlist"])
    if k < 1:
        return 1.0, nlist
    if queries is None:
        queries = max(200, min(RECALL_QUERIES, TUNE_WORK // n))
    qi = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
    q = read_rows(vectors, qi, index._reader)
    _, exact = streaming_knn(q, rows(vectors), k + 1, index.metric)
    exact = _without(exact, qi, k)
    nprobe = 1
    while True:
        index.set_nprobe(nprobe)
        _, ids = index.search(q, k + 1)
        recall = round(recall_at_k(_without(ids, qi, k), exact), 6)
        rerank = int(index.params.get("rerank", RERANK_CANDIDATES))
        log.info("ivfpq: nprobe %d, %d re-ranked: recall@%d %.4f", nprobe, rerank, k, recall)
        if recall >= target or (nprobe >= nlist and rerank >= MAX_RERANK):
            return recall, nprobe
        if rerank < RERANK_BEFORE_PROBE or nprobe >= nlist:  # the codes rank too coarsely: re-rank more
            index.params["rerank"] = min(MAX_RERANK, rerank * 2)
        else:
            nprobe = min(nlist, nprobe * 2)


def sampled_digest(path: Path) -> str:
    """sha256 of a file's size and of :data:`DIGEST_BLOCKS` blocks spread over it (all of a file up to
    that many blocks): refuses a truncated or overwritten lists file without reading 10^8 codes."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= DIGEST_BLOCKS * DIGEST_BLOCK:
            h.update(f.read())
        else:
            step = (size - DIGEST_BLOCK) // (DIGEST_BLOCKS - 1)
            for i in range(DIGEST_BLOCKS):
                f.seek(i * step)
                h.update(f.read(DIGEST_BLOCK))
    return h.hexdigest()


@contextlib.contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """Send what C code prints (FAISS's printf) to stderr meanwhile: stdout may be JSON or a pipe."""
    sys.stdout.flush()
    saved = os.dup(1)
    libc = ctypes.CDLL(None)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _without(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's first ``k`` ids other than its own (rows that lack it drop their last)."""
    out = np.empty((len(ids), k), dtype=np.int64)
    for r, (row, me) in enumerate(zip(ids, own, strict=True)):
        out[r] = row[row != me][:k]
    return out


def build_ivfpq(
    chunks: Callable[[], Iterable[np.ndarray]],
    n: int,
    dim: int,
    metric: str,
    vectors_file: Path,
    recall: float = DEFAULT_RECALL,
    opq: bool = False,
    seed: int = 0,
    max_ram: int | None = None,
    on_disk: bool = False,
    on_phase: Callable[[str], None] | None = None,
) -> RerankedIVFPQ:
    """An ``ivfpq`` index of ``n`` vectors that ``chunks()`` yields (ready: normalised for cosine)
    in two passes, holding one chunk at a time: the training sample, then the codes and the float16
    copy (written to ``vectors_file``). ``nprobe`` is tuned to ``recall`` (:meth:`finish`). On-disk
    lists (:func:`ivfpq_params`) are built in a folder beside ``vectors_file``. ``on_phase`` is
    told each phase as it starts (:data:`BUILD_PHASES`), e.g. to measure its memory."""
    phase = on_phase or (lambda name: None)
    if n < 2:
        raise FinegrainError("an ivfpq index needs at least 2 vectors")
    params = ivfpq_params(n, dim, recall, opq, max_ram, on_disk)
    lists_dir = vectors_file.with_name(vectors_file.name + ".lists")
    index = RerankedIVFPQ.empty(dim, metric, params, vectors_file=vectors_file, n=n, lists_dir=lists_dir)
    take = np.sort(np.random.default_rng(seed).choice(n, size=params["train_points"], replace=False))
    phase("sample")
    sample, start = np.empty((len(take), dim), dtype=np.float32), 0  # filled in place: no second copy
    for chunk in chunks():
        lo, hi = np.searchsorted(take, [start, start + len(chunk)])
        sample[lo:hi] = np.asarray(chunk)[take[lo:hi] - start]
        start += len(chunk)
    if start != n:
        raise FinegrainError(f"the chunks hold {start} vectors, not {n}")
    phase("train")
    index.train(sample)
    del sample
    phase("add")
    for chunk in chunks():
        index.add(chunk)
    phase("seal")
    index.sealed_vectors()
    phase("tune")
    index.finish()
    return index


@INDEX_KINDS.register(KIND)
def _ivfpq(dim: int, metric: str, n: int) -> tuple[Any, dict]:
    params = ivfpq_params(n, dim)
    index = RerankedIVFPQ.empty(dim, metric, params)
    return index, index.params


@INDEX_READ_FLAGS.register(KIND)
def _read_flags(meta: dict) -> int:
    """On-disk lists are mapped by :func:`_open` from the index's folder, not from where they were built."""
    return int(import_faiss().IO_FLAG_SKIP_IVF_DATA) if (meta.get("params") or {}).get("lists") == ON_DISK else 0


def _on_disk_lists(ivf: Any) -> Any:
    """``ivf``'s OnDiskInvertedLists (None if its lists are another kind). It changes nothing; its
    callers (:meth:`RerankedIVFPQ._seal`, :func:`_map_lists`) set ``prefetch_nthread`` to 0 on
    what it returns: FAISS otherwise starts up to 32 threads a search to read the lists about to
    be scanned, which costs more than the scan (7.4 ms against 1.4 ms a query of 64 lists on 2
    cores) where the page cache already holds them or readahead fetches them."""
    faiss = import_faiss()
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(ivf).invlists)
    return invlists if isinstance(invlists, faiss.OnDiskInvertedLists) else None


def _map_lists(path: Path, ivf: Any, params: dict) -> None:
    """Memory-map ``lists.ivfdata`` (read-only) under ``ivf`` once its size and digest match."""
    invlists = _on_disk_lists(ivf)
    if invlists is None:
        raise FinegrainError(f"damaged index file {path.parent / 'index.faiss'}: it holds no on-disk lists {REBUILD}")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise FinegrainError(f"damaged index file {path}: {e.strerror} {REBUILD}") from None
    if size != params.get("lists_bytes") or size != int(invlists.totsize):
        raise FinegrainError(
            f"damaged index file {path}: {size} bytes, the index holds {params.get('lists_bytes')} {REBUILD}"
        )
    if sampled_digest(path) != params.get("lists_digest"):
        raise FinegrainError(f"damaged index file {path}: its checksum does not match meta.json {REBUILD}")
    invlists.filename = str(path)
    invlists.read_only = True
    invlists.prefetch_nthread = 0
    invlists.do_mmap()


@INDEX_OPENERS.register(KIND)
def _open(d: Path, ivf: Any, meta: dict) -> RerankedIVFPQ:
    params = dict(meta.get("params") or {})
    if params.get("lists") == ON_DISK:
        _map_lists(d / LISTS_FILE, ivf, params)
    path = d / VECTORS_FILE
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise FinegrainError(f"damaged index file {path}: {e} {REBUILD}") from None
    if vectors.shape != (int(meta["n"]), int(meta["dim"])) or vectors.dtype != np.float16:
        raise FinegrainError(
            f"damaged index file {path}: {vectors.dtype} {vectors.shape}, the index holds "
            f"{meta['n']} vectors of {meta['dim']} {REBUILD}"
        )
    return RerankedIVFPQ(ivf, meta["metric"], params, vectors=vectors)
