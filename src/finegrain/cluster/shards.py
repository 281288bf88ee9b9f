"""A gallery's vectors as shards on disk: ``RUN/embeddings/shards-<source>-<hash>/``.

```
manifest.json        the source, its rows' fingerprint, shard size, model checksum, engine, precision...
shard-00000.npy      float32 [n, D] vectors of the shard's readable rows, in row order
shard-00000.json     their ids, labels and paths, and the shard's unreadable rows (id, path, reason)
```

Each shard is written by one worker, the vectors first and the JSON last, each to a temporary
file renamed into place: a shard whose JSON is there is whole, and a re-run skips it. Shards made
by another model, engine or listing are removed when the manifest changes.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finegrain.errors import FinegrainError
from finegrain.runs import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
UNREADABLE = "unreadable.tsv"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shards_folder(embeddings: Path, source: str, fingerprint: str) -> Path:
    """The folder of a source's shards: its last path component and its rows' fingerprint."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.rstrip("/\\").rsplit("/", 1)[-1])[:40] or "source"
    return embeddings / f"shards-{stem}-{fingerprint[:10]}"


@dataclass
class ShardResult:
    """What a worker reports for one shard."""

    shard: int
    embedded: int
    unreadable: int


class ShardDir:
    """The shards of one source embedded by one model (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def open(self, manifest: dict) -> None:
        """Create the folder, or keep the shards already there when they were made the same way
        (same manifest); other shards are removed."""
        path = self.folder / MANIFEST
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):
                old = None
            if old == manifest:
                return
            log.info(
                "%s holds shards made another way (model, engine, listing or shard size): starting over", self.folder
            )
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, manifest)

    def manifest(self) -> dict:
        return json.loads((self.folder / MANIFEST).read_text())

    def vectors_file(self, i: int) -> Path:
        return self.folder / f"{shard_name(i)}.npy"

    def rows_file(self, i: int) -> Path:
        return self.folder / f"{shard_name(i)}.json"

    def complete(self, i: int) -> bool:
        """Shard ``i`` is whole: its JSON is there and its vectors are as many as it says."""
        try:
            rows = json.loads(self.rows_file(i).read_text())
            return len(np.load(self.vectors_file(i), mmap_mode="r")) == len(rows["ids"])
        except (OSError, ValueError, KeyError):
            return False

    def write(
        self,
        i: int,
        vectors: np.ndarray,
        ids: list[str],
        labels: list[int],
        paths: list[str],
        unreadable: list[tuple[str, str, str]],
    ) -> ShardResult:
        """Write shard ``i`` whole (vectors, then the JSON that marks it done)."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
        atomic_write_bytes(self.vectors_file(i), buf.getvalue())
        atomic_write_json(
            self.rows_file(i),
            {"shard": i, "ids": ids, "labels": labels, "paths": paths, "unreadable": [list(u) for u in unreadable]},
        )
        return ShardResult(i, len(ids), len(unreadable))

    def rows(self, i: int) -> dict:
        return json.loads(self.rows_file(i).read_text())

    def count(self) -> int:
        return int(self.manifest()["shards"])

    def check_whole(self) -> None:
        """Refuse a set with a missing or partial shard, or an id twice."""
        missing = [i for i in range(self.count()) if not self.complete(i)]
        if missing:
            raise FinegrainError(
                f"{self.folder}: {len(missing)} shard(s) missing or partial (first "
                f"{shard_name(missing[0])}); run the same command again to finish them"
            )

    def gather(self) -> tuple[list[Path], np.ndarray, list[str], list[str], list[list[str]]]:
        """(vector files, labels, paths, ids, unreadable rows) of every shard, in order; an id
        embedded twice or a row both embedded and unreadable is refused."""
        self.check_whole()
        files, labels, paths, ids, bad = [], [], [], [], []
        for i in range(self.count()):
            r = self.rows(i)
            files.append(self.vectors_file(i))
            labels.extend(r["labels"])
            paths.extend(r["paths"])
            ids.extend(r["ids"])
            bad.extend(r["unreadable"])
        seen = set(ids) | {b[0] for b in bad}
        if len(seen) != len(ids) + len(bad):
            raise FinegrainError(
                f"{self.folder}: a row appears twice across the shards; delete the folder and embed again"
            )
        return files, np.asarray(labels, dtype=np.int64), paths, ids, bad

    def write_unreadable(self, bad: list[list[str]]) -> Path:
        """``unreadable.tsv``: id, path and reason of every row that could not be read."""
        path = self.folder / UNREADABLE
        lines = "".join("\t".join(str(v).replace("\t", " ") for v in b) + "\n" for b in bad)
        atomic_write_bytes(path, ("id\tpath\treason\n" + lines).encode())
        return path
