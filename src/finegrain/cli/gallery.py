"""``finegrain gallery``: add, remove, list and count a run's living gallery, also while it is served.

The embedded store is one SQLite database: a server running on the same store sees every change
made here before its next search (SQLite's locking keeps the writers apart)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from finegrain.cli.common import (
    EngineOpt,
    IndexDirOpt,
    JsonOpt,
    console,
    print_json,
    stdout_for,
)
from finegrain.errors import FinegrainError

gallery_app = typer.Typer(help="Add, remove and list the images of a run's living gallery.", no_args_is_help=True)
RunArg = Annotated[Path, typer.Argument(help="A run directory.")]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        help="The gallery store (default RUN/gallery): a folder, milvus://HOST:PORT/COLLECTION or a Milvus Lite *.db."
    ),
]
ADD_BATCH = 32
"""Images stored per transaction: a kill loses at most the batch being written, never part of one."""


def _store(run: Path, store: str | None):
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.gallery.live import default_store
    from finegrain.gallery.store import open_store
    from finegrain.runs import open_run

    return open_store(store or default_store(open_run(run)))


def _files(paths: list[Path], label: str | None) -> list[tuple[Path, str]]:
    """(image file, label) of every PATH: a folder gives all its images, labelled by sub-folder (a
    folder without class sub-folders: the images directly inside it, unlabelled)."""
    # optional: SciPy (the train extra), imported only when this runs
    from finegrain.data.detect import open_gallery_folder
    from finegrain.retrieval.searcher import label_name

    out: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            coll = open_gallery_folder(path)
            out += [
                (r.path, label if label is not None else label_name(coll.class_names, r.label))
                for r in coll.all_records()
            ]
        elif path.is_file():
            out.append((path, label or ""))
        else:
            raise FinegrainError(f"{path}: no such file or folder")
    return out


@gallery_app.command("add")
def add(
    run: RunArg,
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (labels from their sub-folders).")],
    label: Annotated[str | None, typer.Option(help="The label of every image added.")] = None,
    metadata: Annotated[
        str | None, typer.Option(help='A JSON object stored with each image, e.g. {"sku": "A-12"}.')
    ] = None,
    store: StoreOpt = None,
    index_dir: IndexDirOpt = None,
    engine: EngineOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Encode images with the run's model and add them to its gallery (an image already stored keeps its id)."""
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.gallery.filters import parse_metadata
    from finegrain.gallery.live import AddRequest, ImageBytes, LiveGallery
    from finegrain.progress import track

    meta = parse_metadata(metadata)
    files = _files(paths, label)
    with stdout_for(as_json):
        live = LiveGallery(run, store=store, index_dir=index_dir, engine=engine)
        ids: list[int] = []
        starts = range(0, len(files), ADD_BATCH)
        for start in track(starts, len(starts), f"adding {len(files)} images to the gallery"):
            batch = files[start : start + ADD_BATCH]
            done = live.add_many(
                [AddRequest([ImageBytes(p.read_bytes(), str(p))], lab, {"file": p.name, **meta}) for p, lab in batch]
            )
            refused = next((r for r in done if isinstance(r, FinegrainError)), None)
            if refused is not None:  # the batch's other images are stored: run the command again once it is fixed
                raise refused
            ids += [i for r in done if not isinstance(r, FinegrainError) for i in r]
        size = live.store.count()
    if as_json:
        print_json({"ids": ids, "size": size})
    else:
        console.print(f"added {len(set(ids))} image(s) to {live.store.location}: the gallery holds {size}")


@gallery_app.command("remove")
def remove(
    run: RunArg,
    ids: Annotated[list[int], typer.Argument(help="Ids of the entries to remove.")],
    store: StoreOpt = None,
) -> None:
    """Remove entries (and their images) from a run's gallery."""
    s = _store(run, store)
    missing = [i for i in ids if not s.remove(i)]
    console.print(
        f"removed {len(ids) - len(missing)} entr{'y' if len(ids) - len(missing) == 1 else 'ies'}; "
        f"the gallery holds {s.count()}"
    )
    if missing:
        raise FinegrainError(f"no gallery entry with id {', '.join(map(str, missing))}")


@gallery_app.command("list")
def list_entries(
    run: RunArg,
    label: Annotated[str | None, typer.Option(help="Only this label.")] = None,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many entries.")] = 0,
    limit: Annotated[int, typer.Option(min=1, help="At most this many entries.")] = 100,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List a run's gallery entries in id order (id, label, metadata)."""
    s = _store(run, store)
    entries, total = s.list(label, offset, limit), s.count(label)
    if as_json:
        print_json({"entries": [e.to_dict() for e in entries], "count": total})
        return
    table = Table("id", "label", "metadata", title=f"{len(entries)} of {total} entries")
    for e in entries:
        table.add_row(str(e.id), Text(e.label), Text(json.dumps(e.metadata)))
    console.print(table)


@gallery_app.command("stats")
def stats(run: RunArg, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """How many entries a run's gallery holds, per label, and what made its vectors."""
    s = _store(run, store)
    per_label = s.labels()
    out = {
        "store": s.location,
        "backend": type(s).__name__,
        "count": s.count(),
        "labels": len(per_label),
        "per_label": per_label,
        "dim": s.spec.dim,
        "metric": s.spec.metric,
        "model_checksum": s.spec.model_checksum,
    }
    if as_json:
        print_json(out)
        return
    console.print(
        Text(
            f"{out['count']} entries, {out['labels']} labels, {s.spec.dim}-d {s.spec.metric} vectors "
            f"in {s.location} ({out['backend']})"
        )
    )
