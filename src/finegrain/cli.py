"""The ``finegrain`` command line: one entry point, one sub-command per job.

Library modules are imported inside each command so that ``finegrain --help``
stays fast. Every :class:`~finegrain.errors.FinegrainError` is printed as one
line and ends the program with exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape

from finegrain.errors import FinegrainError

PIPE_WIDTH = 10_000  # columns of stdout when it is not a terminal: no file name is cut or folded
RULE_WIDTH = 100  # a rule (section line) in a log file


class PipeConsole(Console):
    """A rich console that, when its output is not a terminal (``> log.txt``, a pipe, nohup), is
    :data:`PIPE_WIDTH` columns wide unless a width was given, so tables print every file name
    whole instead of cutting it at 80 columns with an ellipsis; rules stay :data:`RULE_WIDTH` wide."""

    _fixed_width = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fixed_width = kwargs.get("width") is not None

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if not self._fixed_width and not self.is_terminal:
            return ConsoleDimensions(PIPE_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)

    def rule(self, title: Any = "", *, characters: str = "─", style: Any = "rule.line",
             align: Any = "center") -> None:
        from rich.rule import Rule

        self.print(Rule(title=title, characters=characters, style=style, align=align),
                   width=None if self.is_terminal else RULE_WIDTH)


console = PipeConsole(stderr=False)
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
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (for scripts), nothing else.")]
EngineOpt = Annotated[str, typer.Option(
    help="What runs the model: torch, onnx (RUN/export/model.onnx, `finegrain export RUN`), onnx-int8, or auto "
         "(onnx when the run has an export of its current checkpoint, else torch).")]


def _jsonable(obj: Any) -> Any:
    """``obj`` with paths as strings, numpy numbers as Python's and NaN/infinity as null (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _print_json(data: Any) -> None:
    """``data`` as one JSON document on stdout."""
    typer.echo(json.dumps(_jsonable(data), indent=2, ensure_ascii=False))


@contextlib.contextmanager
def _stdout_for(as_json: bool) -> Iterator[None]:
    """With ``--json``, whatever the work prints (progress, library messages) goes to stderr,
    so stdout carries the JSON document alone."""
    if not as_json:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


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
    as_json: JsonOpt = False,
) -> None:
    """Detect the format, count images and classes, and list every problem file."""
    from finegrain.data.check import check_dataset, check_to_dict, render_check

    with _stdout_for(as_json):
        report = check_dataset(path, format=format, hash_duplicates=not no_hash)
    if as_json:
        _print_json(check_to_dict(report))
    else:
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
    override_stored: Annotated[bool, typer.Option(
        "--override-stored", help="With --resume: continue with this config although it differs from the "
                                  "stored one (which it replaces).")] = False,
) -> None:
    """Train a model; writes the run directory."""
    from finegrain.config import load_config
    from finegrain.tasks.workflow import train_and_evaluate

    sets = list(set_ or [])
    if devices is not None:
        sets.append(f"train.devices={devices}")
    if num_nodes is not None:
        sets.append(f"train.num_nodes={num_nodes}")
    if name:
        sets.append(f"name={name}")
    cfg = load_config(config, profile=profile, overrides=sets)
    run, metrics = train_and_evaluate(cfg, runs, resume=resume, override_stored=override_stored,
                                      evaluate=evaluate_after)
    if metrics is not None or not evaluate_after:  # a DDP process other than the first says nothing
        console.print(f"run directory: [bold]{run.path}[/]")
    if metrics is not None:
        from finegrain.tasks.evaluate import render_metrics

        console.print(render_metrics(metrics))


@app.command("evaluate")
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    protocol: Annotated[Optional[str], typer.Option(help="classification or retrieval (default: the run's).")] = None,
    as_json: JsonOpt = False,
    engine: EngineOpt = "auto",
) -> None:
    """Evaluate a run on its test split; writes metrics.json."""
    _evaluate(run, protocol, as_json, engine)


def _evaluate(run_path: Path, protocol: str | None, as_json: bool = False, engine: str = "auto") -> None:
    from finegrain.tasks.evaluate import evaluate_run, render_metrics

    with _stdout_for(as_json):
        metrics = evaluate_run(run_path, protocol=protocol, engine=engine)
    if as_json:
        _print_json(metrics)
    else:
        console.print(render_metrics(metrics))


# ----------------------------------------------------------------------------- retrieval


@app.command("embed")
def embed(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "test",
    engine: EngineOpt = "auto",
) -> None:
    """Write a split's embeddings (with labels and paths) into the run directory."""
    from finegrain.retrieval.gallery import embed_split

    path = embed_split(run, split, engine=engine)
    console.print(f"wrote [bold]{path}[/]")


@app.command("index")
def index(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    gallery: Annotated[str, typer.Option(help="A split of the run's dataset (train, val, test, all) or a folder.")]
    = "test",
    kind: Annotated[str, typer.Option(help="flat (exact), hnsw or ivf.")] = "flat",
    metric: Annotated[str, typer.Option(help="cosine or euclidean.")] = "cosine",
    engine: EngineOpt = "auto",
) -> None:
    """Embed a gallery and build its similarity index (FAISS) in RUN/index."""
    from finegrain.retrieval.gallery import build_index

    dest, info = build_index(run, gallery=gallery, kind=kind, metric=metric, engine=engine)
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
    as_json: JsonOpt = False,
    engine: EngineOpt = "auto",
) -> None:
    """Print the gallery images most similar to IMAGE (rank, label, score, path)."""
    from rich.table import Table
    from rich.text import Text

    from finegrain.data.images import open_rgb
    from finegrain.report.contact_sheet import contact_sheet
    from finegrain.retrieval.searcher import Searcher

    with _stdout_for(as_json):
        query, _ = open_rgb(image)
        searcher = Searcher(run, index_dir, engine=engine)
        hits, top = searcher.search(query, k=k)
        written = contact_sheet(query, hits, sheet) if sheet else None  # the path it wrote (.png added if none)
    if as_json:
        _print_json(search_to_dict(image, searcher.gallery_size, searcher.prediction_source, hits, top, written))
        return
    if top:
        how = "" if searcher.prediction_source == "classifier" else " (share of the neighbours)"
        console.print(f"predicted{how}: " + ", ".join(f"[bold]{n}[/] {p:.1%}" if i == 0 else f"{n} {p:.1%}"
                                                for i, (n, p) in enumerate(top)))
    table = Table("rank", "label", "score", title=f"{len(hits)} nearest of {searcher.gallery_size}")
    table.add_column("path", overflow="fold")
    for h in hits:  # Text: a name with [brackets] is not markup
        table.add_row(str(h.rank), Text(h.label), f"{h.score:.4f}",
                      Text(h.path + (" (the query itself)" if h.same_image else "")))
    console.print(table)
    if written is not None:
        console.print(Text.assemble("contact sheet: ", (str(written), "bold")))


def search_to_dict(query: Path, gallery_size: int, prediction_source: str, hits: list,
                   top: list[tuple[str, float]] | None, sheet: Path | None = None) -> dict:
    """``finegrain search --json``: the query, the predicted classes and every hit."""
    return {
        "query": str(query), "gallery_size": gallery_size,
        "prediction": {"source": prediction_source,
                       "classes": [{"label": n, "probability": p} for n, p in (top or [])]},
        "hits": [{"rank": h.rank, "label": h.label, "score": h.score, "path": h.path, "same_image": h.same_image}
                 for h in hits],
        "sheet": str(sheet) if sheet is not None else None,
    }


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


@app.command("export")
def export(
    run: Annotated[Path, typer.Argument(help="A trained run directory.")],
    format: Annotated[str, typer.Option("--format", help="onnx.")] = "onnx",
    quantize: Annotated[Optional[str], typer.Option(help="int8: also a statically quantized model, with the "
                                                          "test accuracy it loses.")] = None,
    calibration_images: Annotated[int, typer.Option(help="Training images that calibrate int8.")] = 300,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default 17).")] = None,
) -> None:
    """Export the model to RUN/export/model.onnx (ONNX Runtime serves it without PyTorch)."""
    from finegrain.tasks.export import export_run, render_export

    meta = export_run(run, fmt=format, quantize=quantize, calibration_images=calibration_images, opset=opset)
    for line in render_export(meta, run):
        console.print(line, highlight=False)


@app.command("serve")
def serve(
    run: Annotated[Path, typer.Argument(help="A run directory with an index (`finegrain index RUN`).")],
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="Index folder (default RUN/index).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload in MB.")] = 10.0,
    max_image_mpixels: Annotated[float, typer.Option(
        help="Largest accepted image in megapixels (larger JPEGs are decoded reduced, others refused).")] = 16.0,
    allow_host: Annotated[Optional[list[str]], typer.Option(
        "--allow-host", help="Another Host name to answer to (repeatable); by default only the bound "
                             "address, localhost, 127.0.0.1 and [::1].")] = None,
    engine: EngineOpt = "auto",
) -> None:
    """Serve the search page and JSON API for a run (FastAPI + uvicorn)."""
    from finegrain.serve.app import serve as serve_run

    serve_run(run, index_dir=index_dir, host=host, port=port, max_upload_mb=max_upload_mb,
              max_image_mpixels=max_image_mpixels, allow_hosts=allow_host or [], engine=engine)


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


@app.command("info")
def info(
    as_json: JsonOpt = False,
    no_bench: Annotated[bool, typer.Option("--no-bench", help="Skip the inference speed measurement.")] = False,
    seconds: Annotated[float, typer.Option(min=0.0, help="Time for the speed measurement, shared by fp32 and bf16.")]
    = 5.0,
    workers: Annotated[int, typer.Option(min=0, help="Loader workers to plan threads for (the configs' default).")]
    = 2,
) -> None:
    """Versions, CPU and its vector features, threads, GPU, the precision `auto` picks and why,
    and EfficientNet-Lite0 inference speed here in fp32 and in bf16 autocast."""
    facts = machine_facts(workers=workers, bench_seconds=None if no_bench else seconds, quiet=as_json)
    if as_json:
        _print_json(facts)
    else:
        console.print(render_info(facts))


def machine_facts(workers: int = 2, bench_seconds: float | None = 5.0, quiet: bool = False) -> dict:
    """:func:`finegrain.machine.machine_info` plus torch's threads, the thread plan for ``workers``
    loader workers, and (unless ``bench_seconds`` is None) the measured inference speed."""
    import torch

    from finegrain import machine

    facts = machine.machine_info()
    planned_workers, planned_threads = machine.plan_threads(workers)
    facts.update({
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "thread_plan": {"workers_asked": workers, "workers": planned_workers, "torch_threads": planned_threads},
        "inference_speed": None,
    })
    if bench_seconds is not None:
        batch, size = 8, 224
        if not quiet:
            err_console.print(f"measuring {machine.BENCH_BACKBONE} inference (batches of {batch} at {size}x{size}) "
                              f"in fp32 and bf16 autocast for about {bench_seconds:g} s...", highlight=False)
        with _stdout_for(True):
            speeds = machine.measure_inference_speed(bench_seconds, ("32", "bf16-mixed"), batch, size)
        facts["inference_speed"] = {
            "model": machine.BENCH_BACKBONE, "weights": "random", "batch_size": batch, "image_size": [size, size],
            "input": "uint8, channels-last", "seconds": bench_seconds, "images_per_second": speeds,
        }
    return facts


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def render_info(facts: dict):
    """A rich table of :func:`machine_facts` for the terminal."""
    from rich.table import Table
    from rich.text import Text

    t = Table(show_header=False, title="finegrain on this machine", title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    for name, version in facts["versions"].items():
        t.add_row(name, version or Text("not installed", style="dim"))
    t.add_row("python", facts["python"])
    t.add_row("platform", facts["platform"])
    t.add_section()
    t.add_row("cpu", facts["cpu"])
    t.add_row("vector features", " ".join(facts["cpu_flags"]) or "none known")
    t.add_row("native bf16", "yes" if facts["native_bf16"] else "no")
    t.add_row("cores", str(facts["cores"]))
    t.add_row("torch threads", f"{facts['torch_threads']} intra-op, {facts['torch_interop_threads']} inter-op")
    plan = facts["thread_plan"]
    t.add_row("thread plan", f"{_n(plan['workers_asked'], 'loader worker')} asked: {_n(plan['workers'], 'worker')} "
                             f"+ {_n(plan['torch_threads'], 'torch thread')} (plan_threads)")
    t.add_row("gpu", facts.get("gpu") or "none")
    t.add_row("precision auto", Text.assemble((facts["auto_precision"], "bold"), f": {facts['auto_precision_reason']}"))
    t.add_row("engines", ", ".join(f"{e} ({facts['versions'].get(p) or 'not installed'})" for e, p in
                                   (("torch", "torch"), ("onnx", "onnxruntime"))) + "; --engine auto: onnx for a run "
              "with an export of its current checkpoint")
    speed = facts.get("inference_speed")
    if speed:
        t.add_section()
        ips = speed["images_per_second"]
        fp32, bf16 = ips.get("32"), ips.get("bf16-mixed")
        where = (f"{speed['model']}, random weights, batches of {speed['batch_size']} at "
                 f"{speed['image_size'][0]}x{speed['image_size'][1]}")
        t.add_row("inference fp32", f"{fp32:.1f} images/s ({where})")
        if bf16 is not None:
            ratio = f"{fp32 / bf16:.1f}x slower than fp32" if bf16 < fp32 else f"{bf16 / fp32:.1f}x faster than fp32"
            t.add_row("inference bf16 autocast", f"{bf16:.1f} images/s ({ratio})")
    return t


def main() -> None:
    """Console entry point."""
    try:
        app()
    except FinegrainError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # one line
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: checkpoints already written are kept; use --resume to continue")
        sys.exit(130)


if __name__ == "__main__":
    main()
