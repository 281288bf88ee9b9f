"""What a cluster embeds: a gallery source as one table of rows (path, label, id, box).

A source is a split of the run's dataset (``train``, ``val``, ``test``, ``all``), an image folder,
or a listing file (``.csv`` or ``.parquet``) with a ``path`` column and optional ``label`` (class
names, or class indices) and ``id`` columns, for galleries too large to walk. Listing paths are
local (absolute, or relative to the listing's folder) or URIs any pyarrow file system opens
(``s3://``, ``gs://``, ``hdfs://``...); the listing itself may be such a URI too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finegrain.config import ExperimentConfig
from finegrain.errors import FinegrainError
from finegrain.retrieval.gallery import gallery_records

LISTING_SUFFIXES = (".csv", ".parquet")


@dataclass
class Listing:
    """The rows of a gallery source, in a fixed order (the order of the shards)."""

    paths: list[str]
    labels: np.ndarray
    """int64 class index per row (-1: unlabelled)."""
    ids: list[str]
    boxes: list[tuple[int, int, int, int] | None]
    """The crop of each row (datasets with boxes whose config crops to them), else None."""
    class_names: list[str] | None
    description: str
    bbox_margin: float = 0.0

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """sha256 of the rows' paths and ids: shards of another listing are never reused."""
        h = hashlib.sha256()
        for p, i in zip(self.paths, self.ids, strict=True):
            h.update(f"{p}\0{i}\n".encode())
        return h.hexdigest()


def is_uri(path: str) -> bool:
    return "://" in path


def read_source(source: str, cfg: ExperimentConfig) -> Listing:
    """The rows of ``source`` (a split, a folder or a listing file); errors name the source."""
    if source.lower().endswith(LISTING_SUFFIXES):
        return read_listing(source)

    records, class_names, description = gallery_records(cfg, source)
    crop = cfg.data.crop_bbox
    return Listing(
        paths=[str(r.path) for r in records],
        labels=np.array([r.label for r in records], dtype=np.int64),
        ids=[str(i) for i in range(len(records))],
        boxes=[tuple(r.bbox) if crop and r.bbox is not None else None for r in records],  # type: ignore[misc]
        class_names=class_names,
        description=description,
        bbox_margin=cfg.data.bbox_margin if crop else 0.0,
    )


def read_listing(source: str) -> Listing:
    """A CSV or Parquet listing of ``path[,label][,id]``."""
    # optional: the cluster extra, loaded only where this runs
    import pyarrow.csv as pacsv
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    try:
        if is_uri(source):
            fs, inner = pafs.FileSystem.from_uri(source)
        else:
            fs, inner = pafs.LocalFileSystem(), str(Path(source).expanduser().resolve())
        if source.lower().endswith(".parquet"):
            table = pq.read_table(inner, filesystem=fs)
        else:
            with fs.open_input_stream(inner) as f:
                table = pacsv.read_csv(
                    f, convert_options=pacsv.ConvertOptions(column_types={"path": "string", "id": "string"})
                )
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise FinegrainError(f"cannot read the listing {source}: {str(e).splitlines()[0]}") from None
    if "path" not in table.column_names:
        raise FinegrainError(f"the listing {source} has no 'path' column (columns: {', '.join(table.column_names)})")
    paths = [str(p) for p in table.column("path").to_pylist()]
    if any(not p or p == "None" for p in paths):
        raise FinegrainError(f"the listing {source} has an empty path")
    if not is_uri(source):
        base = Path(inner).parent
        paths = [p if is_uri(p) or Path(p).is_absolute() else str(base / p) for p in paths]
    ids = (
        [str(i) for i in table.column("id").to_pylist()]
        if "id" in table.column_names
        else [str(i) for i in range(len(paths))]
    )
    if len(set(ids)) != len(ids):
        raise FinegrainError(f"the listing {source} repeats an id: every row needs its own")
    labels, class_names = _labels(table, source)
    return Listing(
        paths=paths,
        labels=labels,
        ids=ids,
        boxes=[None] * len(paths),
        class_names=class_names,
        description=f"the {len(paths)} rows of {source}",
    )


def _labels(table, source: str) -> tuple[np.ndarray, list[str] | None]:
    if "label" not in table.column_names:
        return np.full(table.num_rows, -1, dtype=np.int64), None
    values = table.column("label").to_pylist()
    if any(v is None for v in values):
        raise FinegrainError(f"the listing {source} has a row without a label (leave the column out for none)")
    if all(isinstance(v, int) for v in values):
        return np.asarray(values, dtype=np.int64), None
    names = sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[str(v)] for v in values], dtype=np.int64), names
