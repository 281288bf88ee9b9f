"""A run's gallery: which images it holds, their embeddings, and the index built over them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from finegrain.config import ExperimentConfig
from finegrain.data.records import ImageRecord
from finegrain.errors import FinegrainError
from finegrain.inference import open_encoder
from finegrain.inference.outputs import EncodingLoop, Outputs
from finegrain.retrieval.embeddings import SPLITS, reusable_embeddings, save_embeddings
from finegrain.retrieval.gallery_root import common_root
from finegrain.retrieval.index import GalleryIndex, index_builder
from finegrain.retrieval.index_files import META_FILE, recover_swap
from finegrain.runs import open_run

log = logging.getLogger(__name__)


def gallery_records(cfg: ExperimentConfig, gallery: str) -> tuple[list[ImageRecord], list[str], str]:
    """Records of a gallery: a split name of the config's dataset (or ``all``), or an image folder
    (a dataset of any format, or images without class sub-folders: unlabelled, ``UNLABELLED``).

    Returns the records, the class names (empty for an unlabelled folder) and a description.
    """
    # optional: torch, Lightning (the train extra), imported only when this runs
    from finegrain.data.module import split_for

    if not gallery.strip():
        raise FinegrainError(f"the gallery is empty: give a split ({', '.join(SPLITS)}, all) or an image folder")
    if gallery in SPLITS or gallery == "all":
        split = split_for(cfg.data)
        records = (split.train + split.val + split.test) if gallery == "all" else getattr(split, gallery)
        return records, split.class_names, f"{gallery} split of {cfg.data.root}"
    path = Path(gallery)
    if not path.exists():
        raise FinegrainError(f"gallery '{gallery}' is neither a split ({', '.join(SPLITS)}, all) nor a folder")
    # optional: SciPy (the train extra), imported only when this runs
    from finegrain.data.detect import open_gallery_folder

    coll = open_gallery_folder(path)
    records = coll.all_records()
    if not records:
        raise FinegrainError(f"gallery folder {path} holds no images")
    for note in coll.notes:
        log.info("gallery %s: %s", path, note)
    unlabelled = " (unlabelled)" if not coll.class_names else ""
    return records, coll.class_names, f"all images of {path.resolve()}{unlabelled}"


def source_words(description: str) -> str:
    """A gallery's description (:func:`gallery_records`) as it reads after "from": "the test split of
    ...", but "all images of ..."."""
    return description if description.startswith("all ") else f"the {description}"


def embed_records(
    encoder: EncodingLoop, records: list[ImageRecord], description: str = "embedding", maps: bool = False
) -> Outputs:
    """Embeddings of ``records`` (eval transform, every configured size), with their maps if asked."""
    return encoder.encode_records(records, description=description, maps=maps)


def embed_split(run_path: str | Path, split: str, precision: str | None = None, engine: str = "auto") -> Path:
    """``finegrain embed``: write ``embeddings/<split>.npz`` for a split of the run's dataset."""
    run = open_run(run_path)
    encoder = open_encoder(run, engine, precision)
    records, _, _ = gallery_records(encoder.cfg, split)
    out = embed_records(encoder, records, f"embedding {split}")
    save_embeddings(run, split, out, [str(records[i].path) for i in out.indices], encoder)
    return run.embeddings / f"{split}.npz"


REPLACE_RATIO = 2.0
"""An index replaced by one this many times smaller or larger needs ``replace``."""


def check_replacement(dest: Path, description: str, n: int) -> None:
    """Refuse to replace the index in ``dest`` by one of another gallery source or of a very
    different size (``REPLACE_RATIO``): a mistyped ``--gallery`` must not silently discard it."""
    old = recover_swap(dest) / META_FILE
    try:
        meta = json.loads(old.read_text())
        old_n, old_source = int(meta["n"]), meta.get("gallery")
    except (OSError, ValueError, KeyError, TypeError):
        return  # no index, or a damaged one: nothing worth keeping
    other_source = old_source is not None and old_source != description
    if not other_source and old_n / REPLACE_RATIO <= n <= old_n * REPLACE_RATIO:
        return
    source = f" from {source_words(old_source)}" if old_source else ""
    raise FinegrainError(
        f"{dest} holds an index of {old_n} images{source}; the new one would hold {n} from "
        f"{source_words(description)}: pass --replace to replace it"
    )


def build_index(
    run_path: str | Path,
    gallery: str = "test",
    kind: str = "flat",
    metric: str = "cosine",
    out_dir: Path | None = None,
    precision: str | None = None,
    engine: str = "auto",
    replace: bool = False,
    maps: bool | None = None,
) -> tuple[Path, dict]:
    """``finegrain index``: embed the gallery (or reuse the split's saved embeddings made the same
    way) and save a FAISS index with its metadata (the gallery it holds among them). An existing
    index of another gallery or of a very different size is replaced only with ``replace``.

    ``maps``: store each image's embedding map beside the vectors (``maps.npy``), so that explaining
    a hit needs no second pass of the model; None: when the model gives maps (then the gallery is
    always embedded again, as the saved embeddings have no maps)."""

    index_builder(kind, metric)  # a bad kind or metric is refused before the gallery is embedded
    run = open_run(run_path)
    encoder = open_encoder(run, engine, precision)
    records, class_names, description = gallery_records(encoder.cfg, gallery)
    dest = out_dir or run.index
    if not replace:
        check_replacement(dest, description, len(records))
    why_not = encoder.maps_missing() if maps is not False else None
    if maps and why_not:
        raise FinegrainError(f"--maps: {why_not}")
    store_maps = maps is not False and why_not is None
    saved = None if store_maps else reusable_embeddings(run, gallery, records, encoder)
    grid_maps = None
    if saved is not None:
        embeddings, labels, paths = saved
        log.info("reusing the %s embeddings in %s (same model, sizes, precision and engine)", gallery, run.embeddings)
    else:
        out = embed_records(encoder, records, "embedding gallery", maps=store_maps)
        embeddings, labels, paths = out.embeddings, out.labels, [str(records[i].path) for i in out.indices]
        grid_maps = out.maps
    index = GalleryIndex.build(
        embeddings,
        labels,
        paths,
        metric=metric,
        kind=kind,
        model_checksum=encoder.loaded.checksum,
        class_names=class_names,
    )
    index.maps = grid_maps
    index.meta["gallery"] = description
    index.meta["engine"], index.meta["precision"] = encoder.engine, str(encoder.precision)  # searches compare
    index.meta["gallery_root"] = str(common_root(paths))  # the only folder a service hands files out of
    index.save(dest)
    info = {
        "n": len(paths),
        "dim": int(embeddings.shape[1]),
        "kind": kind,
        "metric": metric,
        "gallery": description,
        "approx_recall_at_10": index.meta.get("approx_recall_at_10"),
        "maps": index.meta.get("maps"),
        "no_maps_because": why_not,
    }
    return dest, info
