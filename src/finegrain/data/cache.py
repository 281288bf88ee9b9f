"""The prepared cache: a dataset decoded and resized once into a memory-mapped uint8 array.

``finegrain data prepare`` writes ``<cache root>/prepared/<key>/`` with
``images.npy`` (``[N, H, W, 3]`` uint8), ``index.json`` (the image paths in row
order and the files that could not be read) and a ``.complete`` marker. It is written
into a hidden sibling folder of its own (``.<key>.<pid>@<host>@<tag>.partial.tmp``), fsynced and
renamed into place, so a reader sees a whole cache or none; the folders of killed
preparations are removed by the next one. The key
hashes the image list (paths, sizes, modification times, boxes), the size and the
box margin, so a changed dataset or size never reads a stale cache. Loaders find
and use it without being told (``data.cache: auto``). Rows hold exactly what
:func:`finegrain.data.images.load_resized` returns, so cached and uncached loading
give the same pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from finegrain.data.images import load_resized
from finegrain.data.records import ImageRecord
from finegrain.errors import ImageError
from finegrain.progress import wanted as progress_wanted
from finegrain.runs import atomic_write_text, fsync_dir


def default_cache_root() -> Path:
    """``$FINEGRAIN_CACHE``, else ``~/.cache/finegrain``."""
    env = os.environ.get("FINEGRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "finegrain"


def cache_key(records: list[ImageRecord], size: tuple[int, int], bbox_margin: float | None) -> str:
    h = hashlib.sha1(json.dumps([list(size), bbox_margin]).encode())
    for r in sorted(records, key=lambda r: str(r.path)):
        try:
            st = r.path.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        box = r.bbox if bbox_margin is not None else None
        h.update(f"{r.path}|{stamp}|{box}\n".encode())
    return h.hexdigest()[:16]


class PreparedCache:
    """Read side of a prepared cache; safe to pickle into loader workers (the map is opened lazily)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        index = json.loads((path / "index.json").read_text())
        self.paths: list[str] = index["paths"]
        self.bad: dict[str, str] = index["bad"]
        self.size: tuple[int, int] = tuple(index["size"])
        self._row = {p: i for i, p in enumerate(self.paths)}
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths) - len(self.bad)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def _rows(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path / "images.npy", mmap_mode="r")
        return self._array

    def get(self, record: ImageRecord) -> np.ndarray | None:
        """The cached ``[H, W, 3]`` pixels of a record, or None when it is not cached."""
        key = str(record.path)
        if key not in self._row:
            return None
        if key in self.bad:
            raise ImageError(record.path, "unreadable", self.bad[key] + " (recorded by data prepare)")
        return np.array(self._rows()[self._row[key]])

    def get_many(self, records: list[ImageRecord]) -> tuple[np.ndarray, list[int]]:
        """``[K, H, W, 3]`` pixels of the records the cache holds readable, read in one gather, and
        the positions in ``records`` they belong to (the others: use :meth:`get`, which explains why)."""
        found = [
            (i, self._row[str(r.path)])
            for i, r in enumerate(records)
            if str(r.path) in self._row and str(r.path) not in self.bad
        ]
        rows = np.fromiter((row for _, row in found), dtype=np.int64, count=len(found))
        return self._rows()[rows], [i for i, _ in found]


def find_cache(
    records: list[ImageRecord], size: tuple[int, int], cache_root: Path, bbox_margin: float | None = None
) -> PreparedCache | None:
    path = cache_root / "prepared" / cache_key(records, size, bbox_margin)
    return PreparedCache(path) if (path / ".complete").is_file() else None


def prepare_cache(
    records: list[ImageRecord],
    size: tuple[int, int],
    cache_dir: Path,
    bbox_margin: float | None = None,
    num_workers: int = 2,
    progress: bool = True,
) -> PreparedCache:
    """Decode and resize every record once (threads, progress bar); returns the cache."""

    existing = find_cache(records, size, cache_dir, bbox_margin)
    if existing is not None:
        return existing
    final = cache_dir / "prepared" / cache_key(records, size, bbox_margin)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final.parent)
    work = work_folder(final)
    work.mkdir()
    unique = sorted({str(r.path): r for r in records}.values(), key=lambda r: str(r.path))
    h, w = size
    array = np.lib.format.open_memmap(work / "images.npy", mode="w+", dtype=np.uint8, shape=(len(unique), h, w, 3))
    bad: dict[str, str] = {}

    def load(i: int) -> None:
        r = unique[i]
        box = r.bbox if bbox_margin is not None else None
        try:
            array[i] = load_resized(r.path, size, box, bbox_margin or 0.0)  # noqa: F821 - runs before the del below
        except ImageError as e:
            bad[str(r.path)] = e.reason

    columns = (TextColumn("preparing {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with (
        Progress(*columns, disable=not (progress and progress_wanted())) as bar,
        ThreadPoolExecutor(max(1, num_workers)) as pool,
    ):
        task = bar.add_task(f"{h}x{w}", total=len(unique))
        for _ in pool.map(load, range(len(unique))):
            bar.advance(task)
    array.flush()
    del array
    with open(work / "images.npy", "rb+") as f:  # the rows on disk before any marker says so
        os.fsync(f.fileno())
    atomic_write_text(
        work / "index.json",
        json.dumps({"paths": [str(r.path) for r in unique], "bad": bad, "size": [h, w], "bbox_margin": bbox_margin}),
    )
    atomic_write_text(work / ".complete", "ok\n")
    return PreparedCache(install(work, final))


def install(work: Path, final: Path) -> Path:
    """Rename the complete folder ``work`` to ``final``; when another process installed ``final``
    first, keep theirs and drop ``work``. An incomplete ``final`` (of an older version) is moved
    aside first, never deleted in place: a complete one cannot appear over it meanwhile, since a
    rename onto a non-empty folder fails."""
    for _ in range(2):
        try:
            work.rename(final)
            fsync_dir(final.parent)
            return final
        except OSError:
            if (final / ".complete").is_file():  # another process prepared the same cache meanwhile
                shutil.rmtree(work, ignore_errors=True)
                return final
        aside = work_folder(final, "stale")
        try:
            final.rename(aside)
        except FileNotFoundError:  # someone else moved it aside
            continue
        if (aside / ".complete").is_file():  # completed between our check and the move: put it back
            try:
                aside.rename(final)
            except OSError:
                pass  # another copy is in place by now, and just as good
            shutil.rmtree(work, ignore_errors=True)
            return final
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"cannot install the prepared cache {work} as {final}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


STALE_AFTER_SECONDS = 24 * 3600
"""A work folder of a preparation on another host counts as killed after this long unchanged."""


def work_folder(final: Path, kind: str = "partial") -> Path:
    """A fresh hidden folder name beside ``final`` (``kind``: ``partial`` being written, ``stale`` set
    aside to delete), naming this process and host, by which others tell whether it was abandoned."""
    return final.with_name(f".{final.name}.{os.getpid()}@{socket.gethostname()}@{uuid.uuid4().hex[:8]}.{kind}.tmp")


def _killed(work: Path) -> bool:
    """Whether the preparation writing ``work`` is gone: its pid is dead on this host; on another
    host (a cache on a shared disk), nothing in it has changed for :data:`STALE_AFTER_SECONDS`."""
    owner = work.name.rsplit(".", 2)[0].split(".", 2)[-1]  # pid@host@tag (pid-tag: before hosts were named)
    pid, _, rest = owner.partition("@") if "@" in owner else owner.partition("-")
    host = rest.rpartition("@")[0] if "@" in owner else socket.gethostname()
    if host == socket.gethostname():
        return not pid.isdigit() or not _pid_alive(int(pid))
    try:
        newest = max([work.stat().st_mtime] + [f.stat().st_mtime for f in work.iterdir()])
    except OSError:
        return False  # being removed or renamed right now
    return time.time() - newest > STALE_AFTER_SECONDS


def remove_stale_partials(prepared: Path) -> list[Path]:
    """Remove the work folders of preparations that were killed, and the folders they set aside
    (:func:`install`) but did not delete (see :func:`_killed`)."""
    removed = []
    for p in [*prepared.glob(".*.partial.tmp"), *prepared.glob(".*.stale.tmp")]:
        if _killed(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in prepared.glob("*.partial"):  # the fixed-name work folders of earlier versions
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
