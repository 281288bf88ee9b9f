"""Commands that use a trained run's embeddings: embed, index, search, serve."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from finegrain.cli.common import EngineOpt, IndexDirOpt, JsonOpt, console, print_json, stdout_for
from finegrain.cli.gallery import StoreOpt
from finegrain.errors import FinegrainError
from finegrain.runs import human_bytes

UNLABELLED = "(unlabelled)"
"""How ``finegrain search`` shows a hit without a label."""


def print_embed_report(report) -> None:
    """What ``--ray`` embedding did, in one line."""
    console.print(
        f"embedded {report.embedded} of {report.rows} rows in {report.shards} shards into "
        f"{report.folder} ({report.skipped} shard(s) already done, {report.unreadable} unreadable, "
        f"listed in {report.folder / 'unreadable.tsv'})"
    )


def embed(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    split: Annotated[
        str,
        typer.Option(
            help="train, val, test or all (with --ray: also a folder or a CSV/Parquet listing of path[,label][,id])."
        ),
    ] = "test",
    engine: EngineOpt = "auto",
    ray: Annotated[
        str | None,
        typer.Option(help="Embed on Ray into resumable shards under RUN/embeddings: 'local' or a cluster address."),
    ] = None,
    actors: Annotated[int | None, typer.Option(help="With --ray: model actors (default: the cluster's CPUs).")] = None,
) -> None:
    """Write a split's embeddings (with labels and paths) into the run directory."""
    if ray is not None:
        # start-up: loaded when the command runs, so `finegrain --help` stays fast
        from finegrain.cluster.embed import embed_on_ray

        report = embed_on_ray(run, split, ray, engine=engine, actors=actors)
        print_embed_report(report)
        return
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.retrieval.gallery import embed_split

    path = embed_split(run, split, engine=engine)
    console.print(f"wrote [bold]{path}[/]")


def index(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    gallery: Annotated[
        str, typer.Option(help="A split of the run's dataset (train, val, test, all) or a folder.")
    ] = "test",
    kind: Annotated[
        str, typer.Option(help="flat (exact), hnsw, ivf or ivfpq (10^6+ vectors; see docs/scale.md).")
    ] = "flat",
    metric: Annotated[str, typer.Option(help="cosine or euclidean.")] = "cosine",
    engine: EngineOpt = "auto",
    replace: Annotated[
        bool, typer.Option(help="Replace RUN/index even when it holds another gallery or one of a very different size.")
    ] = False,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Embed on Ray: 'local' starts Ray here, else a cluster address ('auto', 'ray://HOST:10001'); the "
            "gallery may then also be a CSV/Parquet listing of path[,label][,id]."
        ),
    ] = None,
    actors: Annotated[int | None, typer.Option(help="With --ray: model actors (default: the cluster's CPUs).")] = None,
    recall: Annotated[float, typer.Option(help="With --ray and --kind ivfpq: the recall@10 to reach.")] = 0.95,
    maps: Annotated[
        bool | None,
        typer.Option(
            "--maps/--no-maps",
            help="Store each image's map beside the index so explaining a search costs no second pass "
            "(default: when the model gives maps; see docs/explain.md for the size).",
        ),
    ] = None,
    max_ram: Annotated[
        float | None,
        typer.Option(
            help="With --ray and --kind ivfpq: GB of RAM the inverted lists may take; beyond it they live on disk "
            "(memory-mapped). Default: half of this machine's RAM."
        ),
    ] = None,
    on_disk: Annotated[
        bool, typer.Option("--on-disk", help="With --ray and --kind ivfpq: keep the inverted lists on disk.")
    ] = False,
) -> None:
    """Embed a gallery and build its similarity index (FAISS) in RUN/index."""
    if ray is not None and maps:
        raise FinegrainError("--maps: an index built with --ray stores no maps (explaining runs the hits again)")
    if ray is not None:
        # start-up: loaded when the command runs, so `finegrain --help` stays fast
        from finegrain.cluster.gallery import build_index_on_ray

        dest, info, report = build_index_on_ray(
            run,
            gallery,
            ray,
            kind=kind,
            metric=metric,
            recall=recall,
            engine=engine,
            actors=actors,
            max_ram=None if max_ram is None else int(max_ram * 2**30),
            on_disk=on_disk,
        )
        print_embed_report(report)
    else:
        # start-up: loaded when the command runs, so `finegrain --help` stays fast
        from finegrain.retrieval.gallery import build_index

        dest, info = build_index(
            run, gallery=gallery, kind=kind, metric=metric, engine=engine, replace=replace, maps=maps
        )
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.retrieval.gallery import source_words

    what = f"{kind}, lists {info['lists']}" if info.get("lists") else kind
    source = source_words(info["gallery"])
    line = f"indexed {info['n']} images ({info['dim']}-d, {what}, {metric}) from {source} into {dest}"
    if info.get("approx_recall_at_10") is not None:
        line += f"; recall@10 against exact search: {info['approx_recall_at_10']:.3f}"
    if info.get("maps"):
        grid = info["maps"]["grid"]
        line += f"; maps ({grid[0]}x{grid[1]} cells) {human_bytes(info['maps']['bytes_per_image'])} per image"
    console.print(line)


def search(
    run: Annotated[Path, typer.Argument(help="A run directory with an index or a gallery store.")],
    image: Annotated[Path, typer.Argument(help="The query image.")],
    k: Annotated[int, typer.Option(help="Number of neighbours.")] = 10,
    sheet: Annotated[Path | None, typer.Option(help="Write a contact sheet PNG of the results here.")] = None,
    index_dir: Annotated[
        Path | None,
        typer.Option(
            "--index", help="Search this index folder (default: the run's gallery store if it has one, else RUN/index)."
        ),
    ] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
    engine: EngineOpt = "auto",
    explain: Annotated[bool, typer.Option("--explain", help="Lay on the --sheet what the model looked at.")] = False,
) -> None:
    """Print the gallery images most similar to IMAGE (rank, label, score, path).

    The living gallery (RUN/gallery or --store) when the run has one, as `finegrain serve` answers; else its index."""
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.data.images import open_rgb
    from finegrain.gallery.live import LiveGallery, has_store, hit_files
    from finegrain.report.contact_sheet import contact_sheet
    from finegrain.retrieval.explain_search import SearchExplainer
    from finegrain.retrieval.searcher import Searcher

    if sheet is not None:
        check_sheet_path(sheet)
    with stdout_for(as_json), tempfile.TemporaryDirectory(prefix="finegrain-search-") as tmp:
        if explain and sheet is None:
            raise FinegrainError("--explain draws the maps on the contact sheet: give --sheet OUT.png too")
        if store is not None and index_dir is not None:
            raise FinegrainError("give --store (a gallery store) or --index (an index folder), not both")
        query, _ = open_rgb(image)
        live = index_dir is None and (store is not None or has_store(run))
        searcher: Searcher | LiveGallery = (
            LiveGallery(run, store=store, engine=engine) if live else Searcher(run, index_dir, engine=engine)
        )
        why = None
        if explain:  # one pass of the model: the search and the query's maps (and one of the hits for a store)
            hits, top, why = SearchExplainer(searcher).search(query, k)
        else:
            hits, top = searcher.search(query, k=k)
        shown = hit_files(searcher, hits, Path(tmp)) if isinstance(searcher, LiveGallery) and sheet else hits
        try:  # the path it wrote (.png added if none)
            written = contact_sheet(query, shown, sheet, explanation=why) if sheet else None
        except OSError as e:
            raise FinegrainError(f"--sheet: cannot write {e.filename or sheet}: {e.strerror or e}") from None
    if as_json:
        print_json(search_to_dict(image, searcher.gallery_size, searcher.prediction_source, hits, top, written))
    else:
        print_search(searcher.gallery_size, searcher.prediction_source, hits, top, written)


def check_sheet_path(sheet: Path) -> None:
    """Refuse a ``--sheet`` path that cannot be written before anything is searched."""
    folder = sheet.parent
    if sheet.is_dir():
        raise FinegrainError(f"--sheet {sheet} is a folder; give a file name such as {sheet / 'results.png'}")
    if not folder.is_dir():
        raise FinegrainError(f"--sheet {sheet}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise FinegrainError(f"--sheet {sheet}: the folder {folder} is not writable")


def print_search(
    gallery_size: int, prediction_source: str, hits: list, top: list[tuple[str, float]] | None, sheet: Path | None
) -> None:
    """``finegrain search`` for a person: the predicted classes, a table of the hits, the sheet written."""

    if top:
        how = "" if prediction_source == "classifier" else " (share of the neighbours)"
        console.print(
            f"predicted{how}: "
            + ", ".join(f"[bold]{n}[/] {p:.1%}" if i == 0 else f"{n} {p:.1%}" for i, (n, p) in enumerate(top))
        )
    elif hits:
        console.print("no prediction: none of the nearest gallery images has a label")
    table = Table("rank", "label", "score", title=f"{len(hits)} nearest of {gallery_size}")
    table.add_column("path", overflow="fold")
    for h in hits:  # Text: a name with [brackets] is not markup
        table.add_row(
            str(h.rank),
            Text(h.label) if h.label else Text(UNLABELLED, style="dim"),
            f"{h.score:.4f}",
            Text(h.path + (" (the query itself)" if h.same_image else "")),
        )
    console.print(table)
    if sheet is not None:
        console.print(Text.assemble("contact sheet: ", (str(sheet), "bold")))


def search_to_dict(
    query: Path,
    gallery_size: int,
    prediction_source: str,
    hits: list,
    top: list[tuple[str, float]] | None,
    sheet: Path | None = None,
) -> dict:
    """``finegrain search --json``: the query, the predicted classes and every hit."""
    return {
        "query": str(query),
        "gallery_size": gallery_size,
        "prediction": {
            "source": prediction_source,
            "classes": [{"label": n, "probability": p} for n, p in (top or [])],
        },
        "hits": [
            {"rank": h.rank, "id": h.id, "label": h.label, "score": h.score, "path": h.path, "same_image": h.same_image}
            for h in hits
        ],
        "sheet": str(sheet) if sheet is not None else None,
    }


def serve(
    run: Annotated[Path, typer.Argument(help="A run directory with an index (`finegrain index RUN`).")],
    index_dir: IndexDirOpt = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload in MB.")] = 10.0,
    max_image_mpixels: Annotated[
        float,
        typer.Option(help="Largest accepted image in megapixels (larger JPEGs are decoded reduced, others refused)."),
    ] = 16.0,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="Another Host name to answer to (repeatable); by default only the bound "
            "address, localhost, 127.0.0.1 and [::1].",
        ),
    ] = None,
    engine: EngineOpt = "auto",
    max_concurrency: Annotated[
        int, typer.Option(help="Searches run at once; the cores are shared out among them, the others wait.")
    ] = 2,
    store: Annotated[
        str | None,
        typer.Option(
            help="The gallery store: a folder (embedded; default RUN/gallery, made from the index on first use), "
            "milvus://HOST:PORT/COLLECTION or a Milvus Lite file (*.db)."
        ),
    ] = None,
    write_token_file: Annotated[
        Path | None,
        typer.Option(
            help="A file holding the token that allows adding, removing and relabelling gallery images "
            "(Authorization: Bearer TOKEN); or set $FINEGRAIN_WRITE_TOKEN. Without one, writes are off."
        ),
    ] = None,
    read_token_file: Annotated[
        Path | None,
        typer.Option(
            help="A file holding a token that searches and listings then need (or $FINEGRAIN_READ_TOKEN); "
            "without one they are open."
        ),
    ] = None,
) -> None:
    """Serve the search page and JSON API for a run (FastAPI + uvicorn), over its living gallery."""
    # optional: FastAPI (the serve extra), imported only when this runs
    from finegrain.serve.app import serve as serve_run

    serve_run(
        run,
        index_dir=index_dir,
        host=host,
        port=port,
        max_upload_mb=max_upload_mb,
        max_image_mpixels=max_image_mpixels,
        allow_hosts=allow_host or [],
        engine=engine,
        max_concurrency=max_concurrency,
        store=store,
        write_token_file=write_token_file,
        read_token_file=read_token_file,
    )
