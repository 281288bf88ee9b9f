"""The gallery index's files: their names, how labels and paths are encoded, and reading them
back with every check that refuses a damaged, incomplete or inconsistent index.

A save writes them into a temporary sibling folder that then takes the place of the old one
(see :meth:`finegrain.retrieval.index.GalleryIndex.save`); :func:`recover_swap` completes a save
that was killed between the two renames.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Container
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.errors import FinegrainError
from finegrain.faiss_import import import_faiss

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
LABELS_FILE = "labels.npy"
PATHS_FILE = "paths.json"
META_FILE = "meta.json"
INDEX_FILES = (INDEX_FILE, LABELS_FILE, PATHS_FILE, META_FILE)
MAPS_FILE = "maps.npy"
"""Optional: each image's embedding map ``[N, D, h, w]`` float16 (what explaining a hit needs)."""
META_KEYS = ("model_checksum", "dim", "metric", "kind", "n", "index_sha256")
REBUILD = "(rebuild it with `finegrain index RUN`)"


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def recover_swap(d: Path) -> Path:
    """A save killed between moving the old index aside and moving the new one in leaves no ``d``
    but a complete ``.<name>.*.new.tmp`` (meta.json is written last): put it in place. Returns the
    folder that holds the index: ``d``, or the complete new one where ``d``'s folder is read-only."""
    if d.exists():
        return d
    done = [p for p in d.parent.glob(f".{d.name}.*.new.tmp") if (p / META_FILE).is_file()]
    if not done:
        return d
    newest = max(done, key=lambda p: (p / META_FILE).stat().st_mtime)
    try:
        os.rename(newest, d)
    except OSError as e:
        log.warning("cannot complete the interrupted index save into %s (%s); reading %s", d, e.strerror, newest)
        return newest
    log.info("completed the interrupted index save into %s", d)
    return d


def encode_labels(labels: np.ndarray) -> bytes:
    """labels.npy's bytes."""
    buf = io.BytesIO()
    np.save(buf, labels, allow_pickle=False)
    return buf.getvalue()


def encode_maps(maps: np.ndarray) -> bytes:
    """maps.npy's bytes: float16 ``[N, D, h, w]``."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(maps, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def maps_meta(maps: np.ndarray, data: bytes) -> dict:
    """meta.json's ``maps`` entry: the grid, the file's size and sha256, the bytes per image."""
    n, dim, h, w = maps.shape
    return {
        "file": MAPS_FILE,
        "dtype": "float16",
        "dim": int(dim),
        "grid": [int(h), int(w)],
        "bytes": len(data),
        "bytes_per_image": int(dim * h * w * 2),
        "sha256": sha256(data),
    }


def read_maps(d: Path, meta: dict) -> np.ndarray | None:
    """maps.npy, memory-mapped, when meta.json records one; refused unless it holds a float16 map of
    meta's grid and dimension for each of the ``n`` vectors, in a file of the recorded size (its
    sha256, recorded too, is not read back: that would read the whole file)."""
    entry = meta.get("maps")
    if entry is None:
        return None
    path = d / MAPS_FILE
    try:
        maps = np.load(path, mmap_mode="r", allow_pickle=False)
        want = (int(meta["n"]), int(meta["dim"]), *map(int, entry["grid"]))
        if maps.dtype != np.float16 or maps.shape != want:
            raise ValueError(f"holds {maps.dtype} {list(maps.shape)}, meta.json says float16 {list(want)}")
        if path.stat().st_size != int(entry["bytes"]):
            raise ValueError(f"{path.stat().st_size} bytes, meta.json says {entry['bytes']}")
    except FileNotFoundError:
        raise FinegrainError(f"incomplete index in {d}: {MAPS_FILE} is missing {REBUILD}") from None
    except (ValueError, OSError, EOFError, KeyError, TypeError) as e:
        raise FinegrainError(f"damaged index file {path}: {e} {REBUILD}") from None
    return maps


def encode_paths(paths: list[str], class_names: list[str] | None) -> bytes:
    """paths.json's bytes."""
    return (json.dumps({"paths": paths, "class_names": class_names}, indent=2) + "\n").encode()


def check_complete(d: Path) -> None:
    """Refuse a folder that lacks one of the four files."""
    for name in (META_FILE, INDEX_FILE, LABELS_FILE, PATHS_FILE):
        if not (d / name).is_file():
            raise FinegrainError(f"incomplete index in {d}: {name} is missing {REBUILD}")


def read_meta(d: Path, metrics: Container[str], kinds: Container[str]) -> dict:
    """meta.json, with every required entry and a known metric and kind."""
    try:
        meta = json.loads((d / META_FILE).read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        for key in META_KEYS:
            if key not in meta:
                raise ValueError(f"no '{key}' entry")
    except (ValueError, UnicodeDecodeError) as e:
        raise FinegrainError(f"damaged index file {d / META_FILE}: {e}") from e
    if meta["metric"] not in metrics or meta["kind"] not in kinds:
        raise FinegrainError(
            f"damaged index file {d / META_FILE}: unknown metric or kind ({meta['metric']!r}, {meta['kind']!r})"
        )
    return meta


def check_model(d: Path, meta: dict, expected_model_checksum: str | None) -> None:
    """Refuse an index built by another model than the expected one (when one is given)."""
    if expected_model_checksum is not None and meta["model_checksum"] != expected_model_checksum:
        raise FinegrainError(
            f"the index in {d} was built by another model (checksum {str(meta['model_checksum'])[:12]}…, "
            f"this model is {expected_model_checksum[:12]}…); rebuild it with `finegrain index RUN`"
        )


def read_faiss(d: Path, meta: dict, io_flags: int = 0) -> Any:
    """The FAISS index, once its bytes match the sha256 in meta.json (read with FAISS's ``io_flags``)."""
    data = (d / INDEX_FILE).read_bytes()
    if sha256(data) != meta["index_sha256"]:
        raise FinegrainError(
            f"damaged index file {d / INDEX_FILE}: its sha256 does not match meta.json "
            "(rebuild it with `finegrain index RUN`)"
        )
    try:
        return import_faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8), io_flags)
    except Exception as e:  # faiss raises RuntimeError on a bad stream
        raise FinegrainError(
            f"damaged index file {d / INDEX_FILE}: FAISS cannot read it "
            f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
        ) from e


def read_labels(d: Path) -> np.ndarray:
    """labels.npy."""
    try:
        return np.load(d / LABELS_FILE, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FinegrainError(f"damaged index file {d / LABELS_FILE}: {e}") from e


def read_paths(d: Path) -> tuple[list, list[str] | None]:
    """(paths, class_names) of paths.json."""
    try:
        p = json.loads((d / PATHS_FILE).read_text())
        paths = p["paths"]
        class_names = p.get("class_names")
        if not isinstance(paths, list):
            raise ValueError("'paths' is not a list")
        bad = next((i for i, x in enumerate(paths) if not isinstance(x, str)), None)
        if bad is not None:
            raise ValueError(f"path {bad} is not a string")
        if class_names is not None and not (
            isinstance(class_names, list) and all(isinstance(x, str) for x in class_names)
        ):
            raise ValueError("'class_names' is not a list of strings")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise FinegrainError(f"damaged index file {d / PATHS_FILE}: {e}") from e
    return paths, class_names


def check_consistent(d: Path, meta: dict, index: Any, labels: np.ndarray, paths: list) -> None:
    """Refuse files that disagree on the dimension or the number of vectors, or whose sha256
    differs from the one meta.json recorded."""
    problems = []
    if int(index.d) != int(meta["dim"]):
        problems.append(f"index dimension {index.d} != meta dim {meta['dim']}")
    if int(index.ntotal) != int(meta["n"]):
        problems.append(f"index holds {index.ntotal} vectors, meta says {meta['n']}")
    if labels.ndim != 1 or len(labels) != index.ntotal:
        problems.append(f"{labels.size} labels for {index.ntotal} vectors")
    if len(paths) != index.ntotal:
        problems.append(f"{len(paths)} paths for {index.ntotal} vectors")
    if problems:
        raise FinegrainError(
            f"inconsistent index in {d}: {'; '.join(problems)} (rebuild it with `finegrain index RUN`)"
        )
    for name, digest in (meta.get("files_sha256") or {}).items():  # recorded since saves became one unit
        if name in (LABELS_FILE, PATHS_FILE) and sha256((d / name).read_bytes()) != digest:
            raise FinegrainError(
                f"damaged index file {d / name}: its sha256 does not match meta.json "
                "(rebuild it with `finegrain index RUN`)"
            )
