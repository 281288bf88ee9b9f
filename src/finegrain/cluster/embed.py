"""Embedding a gallery on Ray Data: shards of rows go through a pool of actors, each holding the
run's model (ONNX Runtime where the run is exported, else PyTorch) on its share of the cores, and
each writing its shards itself, so the driver only ever holds their counts.

Fault tolerance is Ray's: a killed actor is restarted (``max_restarts``) and the shard it was
embedding is retried (``max_task_retries``); a shard is written to temporary files renamed into
place, so a retried or re-run shard replaces nothing half-written and no row is embedded twice.
A re-run after a crash of the whole job skips the shards already whole.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.cluster.shards import ShardDir, ShardResult, shards_folder
from finegrain.cluster.sources import Listing, is_uri, read_source
from finegrain.data.images import decode, expand_box, load_resized, resize_rgb
from finegrain.errors import FinegrainError, ImageError
from finegrain.inference import open_encoder
from finegrain.inference.outputs import PASS_IMAGES, mean_over_sizes
from finegrain.runs import open_run

log = logging.getLogger(__name__)

SHARD_ROWS = 1024
ACTOR_RESTARTS = 4
"""Restarts of a killed actor, and retries of the shard it held (Ray's ``max_restarts``,
``max_task_retries``)."""


@dataclass
class EmbedReport:
    """What :func:`embed_on_ray` did."""

    folder: Path
    rows: int
    embedded: int
    unreadable: int
    shards: int
    skipped: int
    """Shards already whole before this run (resumed)."""
    seconds: float


def import_ray() -> Any:
    try:
        # optional: the cluster extra, loaded only where this runs
        import ray
        import ray.data
    except ImportError:
        raise FinegrainError("--ray needs Ray Data: pip install 'finegrain[cluster]' (or 'ray[data]')") from None
    return ray


def connect(address: str, num_cpus: int | None = None) -> Any:
    """Ray, connected: ``local`` starts one on this machine (``num_cpus``: its CPUs), anything else
    is a cluster's address (``auto``, ``ray://host:10001``, ``host:6379``). An existing
    connection of this process is kept."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise FinegrainError(f"cannot connect to the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
    return ray


def load_pixels(path: str, size: tuple[int, int], box: tuple[int, int, int, int] | None, margin: float) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of one row, decoded as the evaluation loaders decode it (local files) or
    from any file system pyarrow opens (URIs)."""

    if not is_uri(path):
        return load_resized(path, size, box, margin)
    # optional: the cluster extra, loaded only where this runs
    import pyarrow.fs as pafs

    try:
        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_file(inner) as f:
            im, _ = decode(f, path)
    except (OSError, ValueError) as e:
        raise ImageError(path, "missing", str(e).splitlines()[0]) from None
    if box is not None:
        im = im.crop(expand_box(box, margin, im.width, im.height))
    return resize_rgb(im, size)


class ShardEmbedder:
    """A Ray Data actor: the run's model on ``threads`` intra-op threads, embedding whole shards."""

    def __init__(
        self, run_path: str, engine: str, precision: str | None, threads: int, folder: str, margin: float
    ) -> None:

        os.environ["OMP_NUM_THREADS"] = str(threads)
        self.encoder = open_encoder(run_path, engine, precision)
        self.encoder.use_threads(threads)
        self.shards = ShardDir(Path(folder))
        self.margin = margin

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [
            self.embed_shard(int(i), json.loads(str(rows)))
            for i, rows in zip(batch["shard"], batch["rows"], strict=True)
        ]
        return {
            "shard": np.array([r.shard for r in results]),
            "embedded": np.array([r.embedded for r in results]),
            "unreadable": np.array([r.unreadable for r in results]),
        }

    def embed_shard(self, i: int, rows: dict) -> ShardResult:

        enc = self.encoder
        good: list[int] = []
        bad: list[tuple[str, str, str]] = []
        pixels: list[list[np.ndarray]] = []
        for r, (path, box) in enumerate(zip(rows["paths"], rows["boxes"], strict=True)):
            try:
                pixels.append([load_pixels(path, s, tuple(box) if box else None, self.margin) for s in enc.sizes])
                good.append(r)
            except ImageError as e:
                bad.append((rows["ids"][r], path, f"{e.reason}: {e.detail}" if e.detail else e.reason))
        outs = []
        step = max(1, PASS_IMAGES // (2 if enc.tta_flip else 1))
        for s in range(0, len(good), step):
            per_size = [
                enc.forward(np.stack([p[k] for p in pixels[s : s + step]]).transpose(0, 3, 1, 2))
                for k in range(len(enc.sizes))
            ]
            outs.append(mean_over_sizes(per_size)["embedding"])
        if outs:
            vectors = np.concatenate(outs)
        else:  # no readable row: an empty shard of the model's width
            probe = enc.forward(np.zeros((1, 3, *enc.sizes[0]), dtype=np.uint8))["embedding"]
            vectors = np.zeros((0, probe.shape[1]), dtype=np.float32)
        return self.shards.write(
            i,
            vectors,
            [rows["ids"][r] for r in good],
            [int(rows["labels"][r]) for r in good],
            [rows["paths"][r] for r in good],
            bad,
        )


def manifest_of(listing: Listing, source: str, shard_rows: int, checksum: str, signature: dict) -> dict:
    return {
        "source": source,
        "rows": len(listing),
        "fingerprint": listing.fingerprint(),
        "shard_rows": shard_rows,
        "shards": (len(listing) + shard_rows - 1) // shard_rows,
        "model_checksum": checksum,
        **signature,
        "class_names": listing.class_names,
    }


def embed_on_ray(
    run_path: str | Path,
    source: str,
    address: str = "local",
    engine: str = "auto",
    precision: str | None = None,
    actors: int | None = None,
    cpus_per_actor: int = 1,
    shard_rows: int = SHARD_ROWS,
) -> EmbedReport:
    """Embed every row of ``source`` into shards under ``RUN/embeddings/`` on Ray (see the module
    docstring); returns what was done. ``actors``: the pool's size (default: the cluster's CPUs
    divided by ``cpus_per_actor``)."""

    if shard_rows < 1 or cpus_per_actor < 1 or (actors is not None and actors < 1):
        raise FinegrainError("--actors, --cpus-per-actor and the shard size must be at least 1")
    run = open_run(run_path)
    probe = open_encoder(run, engine, precision)  # the driver checks the model once, and names it
    listing = read_source(source, probe.cfg)
    if not len(listing):
        raise FinegrainError(f"{source} holds no images")
    manifest = manifest_of(listing, source, shard_rows, probe.loaded.checksum, probe.signature())
    engine = probe.engine if engine == "auto" else engine  # every actor runs what the driver found
    del probe
    shards = ShardDir(shards_folder(run.embeddings, source, manifest["fingerprint"]))
    shards.open(manifest)
    pending = [i for i in range(manifest["shards"]) if not shards.complete(i)]
    skipped = manifest["shards"] - len(pending)
    t0 = time.perf_counter()
    if pending:
        ray = connect(address)
        pool = actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_actor)
        items = [{"shard": i, "rows": _rows_json(listing, i, shard_rows)} for i in pending]
        done = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardEmbedder,
            batch_size=1,
            concurrency=pool,
            num_cpus=cpus_per_actor,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_RESTARTS,
            fn_constructor_kwargs={
                "run_path": str(run.path),
                "engine": engine,
                "precision": precision,
                "threads": cpus_per_actor,
                "folder": str(shards.folder),
                "margin": listing.bbox_margin,
            },
        )
        finished = [int(r["shard"]) for r in done.iter_rows()]
        if sorted(finished) != pending:
            log.warning("Ray reported shards %s for %d pending", sorted(set(pending) - set(finished))[:5], len(pending))
    seconds = time.perf_counter() - t0
    _, _, paths, _, bad = shards.gather()
    shards.write_unreadable(bad)
    return EmbedReport(shards.folder, len(listing), len(paths), len(bad), manifest["shards"], skipped, seconds)


def _rows_json(listing: Listing, i: int, shard_rows: int) -> str:
    s = slice(i * shard_rows, (i + 1) * shard_rows)
    return json.dumps(
        {
            "paths": listing.paths[s],
            "ids": listing.ids[s],
            "labels": listing.labels[s].tolist(),
            "boxes": listing.boxes[s],
        }
    )
