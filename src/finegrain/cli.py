"""The ``finegrain`` command line: one entry point, one sub-command per job.

Library modules are imported inside each command so that ``finegrain --help``
stays fast. Every :class:`~finegrain.errors.FinegrainError` is printed as one
line and ends the program with exit code 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from finegrain.errors import FinegrainError

console = Console(stderr=False)
err_console = Console(stderr=True)

app = typer.Typer(
    name="finegrain",
    help="Fine-grained image recognition and retrieval: train, evaluate, index, search, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect, prepare, synthesise and download datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
experiments_app = typer.Typer(help="Run the experiment catalogue and compare the results.", no_args_is_help=True)
app.add_typer(experiments_app, name="experiments")

SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key, e.g. --set optim.lr=0.01 (repeatable)."),
]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", "-p", help="A profile of the config, e.g. quick.")]


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
    )
    for noisy in ("PIL", "matplotlib", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging.")] = False) -> None:
    _setup_logging(verbose)


# ----------------------------------------------------------------------------- data


@data_app.command("check")
def data_check(
    path: Annotated[Path, typer.Argument(help="Dataset folder (or CSV file).")],
    format: Annotated[str, typer.Option(help="Dataset format, or auto.")] = "auto",
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the train/test duplicate search.")] = False,
) -> None:
    """Detect the format, count images and classes, and list every problem file."""
    from finegrain.data.check import check_dataset, render_check

    report = check_dataset(path, format=format, hash_duplicates=not no_hash)
    console.print(render_check(report))
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("prepare")
def data_prepare(
    source: Annotated[str, typer.Argument(help="A config (file or shipped name) or a dataset folder.")],
    size: Annotated[Optional[tuple[int, int]], typer.Option(help="HEIGHT WIDTH (default: the config's).")] = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache root (default ~/.cache/finegrain).")] = None,
    workers: Annotated[int, typer.Option(help="Decoding workers.")] = 2,
) -> None:
    """Decode and resize a dataset once into memory-mapped uint8 arrays."""
    from finegrain.data.module import prepare_for_config

    cfg = _config_for_data(source, profile, set_ or [], size)
    for line in prepare_for_config(cfg, cache_dir=cache_dir, workers=workers):
        console.print(line)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into.")],
    format: Annotated[str, typer.Option(help="stanford_cars, tiny_imagenet or image_folder.")] = "stanford_cars",
    layout: Annotated[str, typer.Option(help="Stanford Cars layout: devkit, all_images or kaggle.")] = "devkit",
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 12,
    train_per_class: Annotated[int, typer.Option(help="Training images per class.")] = 24,
    test_per_class: Annotated[int, typer.Option(help="Test images per class.")] = 12,
    size: Annotated[tuple[int, int], typer.Option(help="HEIGHT WIDTH of the images.")] = (96, 128),
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> None:
    """Write a deterministic synthetic fine-grained dataset in a real format."""
    from finegrain.data.synth import make_synthetic

    root = make_synthetic(
        out, format=format, num_classes=classes, train_per_class=train_per_class,
        test_per_class=test_per_class, size=size, seed=seed, layout=layout,
    )
    console.print(f"wrote a synthetic {format} dataset to [bold]{root}[/]")


@data_app.command("download")
def data_download(
    dataset: Annotated[str, typer.Argument(help="tiny-imagenet or stanford-cars.")],
    dest: Annotated[Path, typer.Option(help="Folder to download into.")] = Path("data"),
    url: Annotated[Optional[str], typer.Option(help="Override the archive URL (a mirror).")] = None,
) -> None:
    """Download and unpack a dataset (resumable, checksum verified)."""
    from finegrain.data import download

    if dataset in ("stanford-cars", "stanford_cars", "cars"):
        console.print(download.stanford_cars_instructions())
        return
    if dataset not in ("tiny-imagenet", "tiny_imagenet", "tiny-imagenet-200"):
        raise FinegrainError(f"unknown dataset '{dataset}'; valid: tiny-imagenet, stanford-cars")
    kwargs = {"url": url, "md5": None} if url else {}
    root = download.download_tiny_imagenet(dest, **kwargs)
    console.print(f"Tiny ImageNet is ready at [bold]{root}[/]")


def _config_for_data(source: str, profile: str | None, sets: list[str], size: tuple[int, int] | None):
    """A config from a config name/file, or a default config over a dataset folder."""
    from finegrain.config import build_config, load_config

    p = Path(source)
    if p.exists() and (p.is_dir() or p.suffix.lower() == ".csv"):
        cfg = build_config({"data": {"root": str(p)}}, overrides=sets)
    else:
        cfg = load_config(source, profile=profile, overrides=sets)
    if size is not None:
        cfg.data.image_size = tuple(size)
    return cfg


# ----------------------------------------------------------------------------- train / evaluate


@app.command("train")
def train(
    config: Annotated[str, typer.Argument(help="A config file, or a shipped config name (see `finegrain configs`).")],
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    name: Annotated[Optional[str], typer.Option(help="Run name (default: the config's name).")] = None,
    runs: Annotated[Path, typer.Option(help="Folder that holds run directories.")] = Path("runs"),
    resume: Annotated[bool, typer.Option(help="Continue the run from its last checkpoint.")] = False,
    devices: Annotated[Optional[str], typer.Option(help="Devices per node (DDP when > 1).")] = None,
    num_nodes: Annotated[Optional[int], typer.Option(help="Number of nodes (DDP).")] = None,
    evaluate_after: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="Evaluate on test when done.")] = True,
) -> None:
    """Train a model; writes the run directory."""
    from finegrain.config import load_config
    from finegrain.tasks.engine import fit

    sets = list(set_ or [])
    if devices is not None:
        sets.append(f"train.devices={devices}")
    if num_nodes is not None:
        sets.append(f"train.num_nodes={num_nodes}")
    if name:
        sets.append(f"name={name}")
    cfg = load_config(config, profile=profile, overrides=sets)
    if cfg.task == "knn":  # nothing to train: embeddings of the source run + a kNN vote
        from finegrain.runs import create_run

        run = create_run(cfg, runs, resume=True)
        _evaluate(run.path, None)
        return
    run, global_zero = fit(cfg, runs_root=runs, resume=resume)
    if not global_zero:
        return
    console.print(f"run directory: [bold]{run.path}[/]")
    if evaluate_after:
        _evaluate(run.path, None)


@app.command("evaluate")
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    protocol: Annotated[Optional[str], typer.Option(help="classification or retrieval (default: the run's).")] = None,
) -> None:
    """Evaluate a run on its test split; writes metrics.json."""
    _evaluate(run, protocol)


def _evaluate(run_path: Path, protocol: str | None) -> None:
    from finegrain.tasks.evaluate import evaluate_run, render_metrics

    metrics = evaluate_run(run_path, protocol=protocol)
    console.print(render_metrics(metrics))


# ----------------------------------------------------------------------------- retrieval


@app.command("embed")
def embed(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "test",
) -> None:
    """Write a split's embeddings (with labels and paths) into the run directory."""
    from finegrain.retrieval.gallery import embed_split

    path = embed_split(run, split)
    console.print(f"wrote [bold]{path}[/]")


@app.command("index")
def index(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    gallery: Annotated[str, typer.Option(help="A split of the run's dataset (train, val, test, all) or a folder.")]
    = "test",
    kind: Annotated[str, typer.Option(help="flat (exact), hnsw or ivf.")] = "flat",
    metric: Annotated[str, typer.Option(help="cosine or euclidean.")] = "cosine",
) -> None:
    """Embed a gallery and build its similarity index (FAISS) in RUN/index."""
    from finegrain.retrieval.gallery import build_index

    dest, info = build_index(run, gallery=gallery, kind=kind, metric=metric)
    line = f"indexed {info['n']} images ({info['dim']}-d, {kind}, {metric}) from the {info['gallery']} into {dest}"
    if info.get("approx_recall_at_10") is not None:
        line += f"; recall@10 against exact search: {info['approx_recall_at_10']:.3f}"
    console.print(line)


@app.command("search")
def search(
    run: Annotated[Path, typer.Argument(help="A run directory with an index.")],
    image: Annotated[Path, typer.Argument(help="The query image.")],
    k: Annotated[int, typer.Option(help="Number of neighbours.")] = 10,
    sheet: Annotated[Optional[Path], typer.Option(help="Write a contact sheet PNG of the results here.")] = None,
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="Index folder (default RUN/index).")] = None,
) -> None:
    """Print the gallery images most similar to IMAGE (rank, label, score, path)."""
    from rich.table import Table

    from finegrain.data.images import open_rgb
    from finegrain.report.contact_sheet import contact_sheet
    from finegrain.retrieval.searcher import Searcher

    query, _ = open_rgb(image)
    searcher = Searcher(run, index_dir)
    hits, top = searcher.search(query, k=k)
    if top:
        how = "" if searcher.prediction_source == "classifier" else " (share of the neighbours)"
        console.print(f"predicted{how}: " + ", ".join(f"[bold]{n}[/] {p:.1%}" if i == 0 else f"{n} {p:.1%}"
                                                for i, (n, p) in enumerate(top)))
    table = Table("rank", "label", "score", "path", title=f"{len(hits)} nearest of {searcher.gallery_size}")
    for h in hits:
        table.add_row(str(h.rank), h.label, f"{h.score:.4f}", h.path + (" (the query itself)" if h.same_image else ""))
    console.print(table)
    if sheet:
        contact_sheet(query, hits, sheet)
        console.print(f"contact sheet: [bold]{sheet}[/]")


@app.command("demo")
def demo(
    data: Annotated[Optional[Path], typer.Option(help="Run on this dataset instead of the built-in synthetic one.")]
    = None,
    runs: Annotated[Path, typer.Option(help="Folder for the demo's run directories.")] = Path("runs"),
    epochs: Annotated[Optional[int], typer.Option(help="Override the number of epochs.")] = None,
) -> None:
    """Train a classifier and an embedding model, evaluate, index, search: the whole flow in minutes."""
    from finegrain.demo import run_demo

    run_demo(console, data=data, runs_root=runs, epochs=epochs)


@app.command("report")
def report(
    runs_: Annotated[list[Path], typer.Argument(metavar="RUN...", help="One or more run directories.")],
    out: Annotated[Optional[Path], typer.Option(help="Cross-run page (default runs/report.html with 2+ runs).")]
    = None,
) -> None:
    """Write a self-contained HTML report per run (RUN/report/index.html), and one across runs."""
    from finegrain.report.html import write_multi_report, write_report
    from finegrain.runs import open_run

    paths = [open_run(r).path for r in runs_]
    for p in paths:
        console.print(f"report: [bold]{write_report(p)}[/]")
    if len(paths) > 1 or out is not None:
        dest = write_multi_report(paths, out or paths[0].parent / "report.html")
        console.print(f"comparison: [bold]{dest}[/]")


@experiments_app.command("run")
def experiments_run(
    suite: Annotated[str, typer.Argument(help="seed-000, seed-001, ours or all (or a comma-separated config list).")],
    profile: ProfileOpt = None,
    data: Annotated[Optional[Path], typer.Option(help="Run every config on this dataset instead.")] = None,
    runs: Annotated[Path, typer.Option(help="Folder that holds run directories.")] = Path("runs"),
    set_: SetOpt = None,
) -> None:
    """Run a suite: finished runs are skipped, interrupted ones resumed; writes the comparison table."""
    from finegrain.experiments import run_suite

    target: str | list[str] = suite if "," not in suite else [s for s in suite.split(",") if s]
    tables = run_suite(target, profile=profile, data=data, runs_root=runs, overrides=list(set_ or []),
                       console=console)
    console.print(f"tables: [bold]{tables['markdown']}[/] and [bold]{tables['html']}[/]")
    if tables["failed"]:
        raise typer.Exit(1)


@app.command("serve")
def serve(
    run: Annotated[Path, typer.Argument(help="A run directory with an index (`finegrain index RUN`).")],
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="Index folder (default RUN/index).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload in MB.")] = 10.0,
) -> None:
    """Serve the search page and JSON API for a run (FastAPI + uvicorn)."""
    from finegrain.serve.app import serve as serve_run

    serve_run(run, index_dir=index_dir, host=host, port=port, max_upload_mb=max_upload_mb)


@app.command("configs")
def configs() -> None:
    """List the shipped experiment configs."""
    from rich.table import Table

    from finegrain.config import CONFIG_DIR, load_raw, shipped_configs

    names = shipped_configs()
    if not names:  # an install without its package data: say so rather than print an empty table
        raise FinegrainError(f"no shipped configs found in {CONFIG_DIR}; this finegrain install is incomplete")
    table = Table(title=f"configs in {CONFIG_DIR}")
    table.add_column("name", no_wrap=True)  # whole names, however narrow the terminal: `finegrain train NAME` takes them
    for col in ("task", "description", "profiles"):
        table.add_column(col)
    for n in names:
        raw = load_raw(CONFIG_DIR / f"{n}.yaml")
        table.add_row(n, raw.get("task", "classification"), raw.get("description", ""),
                      ", ".join(raw.get("profiles", {}) or {}))
    console.print(table)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except FinegrainError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: checkpoints already written are kept; use --resume to continue")
        sys.exit(130)


if __name__ == "__main__":
    main()
