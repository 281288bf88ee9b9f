"""A run's index built from a gallery embedded on Ray: ``finegrain index RUN --gallery SOURCE --ray``.

The shards are read one at a time for the ``ivfpq`` kind (its build never holds every vector);
the other kinds index every vector in RAM, as they search it there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from finegrain.cluster.embed import EmbedReport, embed_on_ray
from finegrain.cluster.shards import ShardDir
from finegrain.errors import FinegrainError
from finegrain.metrics.retrieval import l2_normalize
from finegrain.retrieval.index import GalleryIndex, index_builder, index_meta
from finegrain.retrieval.large_index import DEFAULT_RECALL, KIND, build_ivfpq
from finegrain.runs import open_run


def shard_vectors(files: list[Path], metric: str) -> Iterator[np.ndarray]:
    """The shards' vectors one file at a time, normalised for cosine (as the index stores them)."""
    for f in files:
        x = np.asarray(np.load(f, mmap_mode="r"), dtype=np.float32)
        if len(x):
            yield l2_normalize(x) if metric == "cosine" else x


def index_from_shards(
    shards: ShardDir,
    dest: Path,
    kind: str = "flat",
    metric: str = "cosine",
    recall: float = DEFAULT_RECALL,
    max_ram: int | None = None,
    on_disk: bool = False,
) -> GalleryIndex:
    """Build and save (into ``dest``) the index of a whole set of shards (``max_ram`` bytes and
    ``on_disk``: where an ivfpq index's lists live, see :func:`~finegrain.retrieval.large_index.ivfpq_params`)."""
    files, labels, paths, _, _ = shards.gather()
    manifest = shards.manifest()
    checksum, class_names = manifest["model_checksum"], manifest.get("class_names")
    if kind != KIND:
        x = np.concatenate(list(shard_vectors(files, "euclidean")))  # as stored: build() normalises for cosine
        index = GalleryIndex.build(
            x, labels, paths, metric=metric, kind=kind, model_checksum=checksum, class_names=class_names
        )
    else:
        dims = {int(np.load(f, mmap_mode="r").shape[1]) for f in files}
        if len(dims) != 1:  # FAISS would fail later with an assertion that names nothing
            raise FinegrainError(f"shards of different widths {sorted(dims)} in {files[0].parent}; embed again")
        (dim,) = dims
        t0 = time.perf_counter()
        work = dest.parent / f".{dest.name}-vectors.part.npy"
        ivfpq = build_ivfpq(
            lambda: shard_vectors(files, metric),
            len(paths),
            dim,
            metric,
            work,
            recall=recall,
            max_ram=max_ram,
            on_disk=on_disk,
        )
        meta = index_meta(
            checksum,
            dim,
            metric,
            kind,
            len(paths),
            ivfpq.params,
            ivfpq.params["measured_recall"],
            time.perf_counter() - t0,
        )
        index = GalleryIndex(ivfpq, labels, paths, class_names, meta)
    index.save(dest)
    return index


def build_index_on_ray(
    run_path: str | Path,
    gallery: str,
    address: str = "local",
    kind: str = "flat",
    metric: str = "cosine",
    recall: float = DEFAULT_RECALL,
    engine: str = "auto",
    actors: int | None = None,
    cpus_per_actor: int = 1,
    max_ram: int | None = None,
    on_disk: bool = False,
) -> tuple[Path, dict, EmbedReport]:
    """Embed ``gallery`` on Ray (resuming whole shards), then index it into ``RUN/index``."""

    index_builder(kind, metric)  # an unknown kind or metric is named before anything runs
    report = embed_on_ray(run_path, gallery, address, engine=engine, actors=actors, cpus_per_actor=cpus_per_actor)
    run = open_run(run_path)
    index = index_from_shards(ShardDir(report.folder), run.index, kind, metric, recall, max_ram, on_disk)
    info = {
        "n": index.n,
        "dim": index.dim,
        "kind": kind,
        "metric": metric,
        "gallery": gallery,
        "approx_recall_at_10": index.meta.get("approx_recall_at_10"),
        "lists": (index.meta.get("params") or {}).get("lists"),
    }
    return run.index, info, report
