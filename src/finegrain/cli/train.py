"""Commands that make and judge runs: train, evaluate, export, experiments, demo, report, configs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from finegrain.cli.common import EngineOpt, JsonOpt, ProfileOpt, RunsOpt, SetOpt, console, print_json, stdout_for
from finegrain.errors import FinegrainError


def train(
    config: Annotated[str, typer.Argument(help="A config file, or a shipped config name (see `finegrain configs`).")],
    data: Annotated[
        Path | None,
        typer.Option(
            help="Your images: a folder of class sub-folders (train/ and test/ inside if you have a test split) or a "
            "CSV list; sets data.root."
        ),
    ] = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    name: Annotated[str | None, typer.Option(help="Run name (default: the config's name).")] = None,
    runs: RunsOpt = Path("runs"),
    resume: Annotated[bool, typer.Option(help="Continue the run from its last checkpoint.")] = False,
    devices: Annotated[str | None, typer.Option(help="Devices per node (DDP when > 1).")] = None,
    num_nodes: Annotated[int | None, typer.Option(help="Number of nodes (DDP).")] = None,
    evaluate_after: Annotated[
        bool, typer.Option("--evaluate/--no-evaluate", help="Evaluate on test when done.")
    ] = True,
    override_stored: Annotated[
        bool,
        typer.Option(
            "--override-stored",
            help="With --resume: continue with this config although it differs from the "
            "stored one (which it replaces).",
        ),
    ] = False,
    budget: Annotated[
        str | None,
        typer.Option(
            help="A time budget such as 30m or 2h, in wall-clock time on this machine for the whole command: "
            "chooses the image size, frozen stages, cached views and epochs of a frozen-cache recipe "
            "(classify, retrieve) from the data's size and a speed probe, prints the plan, and stops "
            "training in time for the evaluation (--resume continues)."
        ),
    ] = None,
) -> None:
    """Train a model; writes the run directory."""
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.config import data_override, load_config
    from finegrain.tasks.workflow import train_and_evaluate

    started = time.monotonic()

    sets = [data_override(data)] if data is not None else []
    sets += list(set_ or [])
    if devices is not None:
        sets.append(f"train.devices={devices}")
    if num_nodes is not None:
        sets.append(f"train.num_nodes={num_nodes}")
    if name:
        sets.append(f"name={name}")
    cfg = load_config(config, profile=profile, overrides=sets)
    changed = [s for s in set_ or [] if not s.startswith("description=")]
    plan, deadline = None, None
    if budget is not None:
        # start-up: loaded when the command runs, so `finegrain --help` stays fast
        from finegrain.tasks.budget import parse_budget, plan_for, reserved_seconds

        seconds = parse_budget(budget)
        if not resume:  # a resumed run keeps its stored settings: no new plan
            plan = plan_for(cfg, seconds)
            console.print(plan.words(), highlight=False)
            cfg = load_config(config, profile=profile, overrides=sets + plan.overrides())
        deadline = started + seconds - reserved_seconds(seconds, plan)
    if (changed or plan) and cfg.description:  # the file's words describe the file: say what this run changed
        words = cfg.description + (f"; with --set {', '.join(changed)}" if changed else "")
        words += f"; planned for --budget {budget}: {', '.join(plan.overrides())}" if plan else ""
        cfg = cfg.model_copy(update={"description": words})
    run, metrics = train_and_evaluate(
        cfg, runs, resume=resume, override_stored=override_stored, evaluate=evaluate_after, deadline=deadline
    )
    if plan is not None and (metrics is not None or not evaluate_after):
        # start-up: loaded when the command runs, so `finegrain --help` stays fast
        from finegrain.tasks.budget import minutes, write_plan

        spent = time.monotonic() - started
        write_plan(run.path, plan, spent)
        console.print(
            f"budget {minutes(plan.budget_seconds)}: {minutes(spent)} spent (predicted "
            f"{minutes(plan.predicted_seconds)}); the plan is in {run.path / 'budget.json'}",
            highlight=False,
        )
    if metrics is not None or not evaluate_after:  # a DDP process other than the first says nothing
        console.print(f"run directory: [bold]{run.path}[/]")
    if metrics is not None:
        # start-up: loaded when the command runs, so `finegrain --help` stays fast
        from finegrain.tasks.evaluate import render_metrics

        console.print(render_metrics(metrics))


def evaluate(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    protocol: Annotated[str | None, typer.Option(help="classification or retrieval (default: the run's).")] = None,
    as_json: JsonOpt = False,
    engine: EngineOpt = "auto",
) -> None:
    """Evaluate a run on its test split; writes metrics.json."""
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.tasks.evaluate import evaluate_run, render_metrics

    with stdout_for(as_json):
        metrics = evaluate_run(run, protocol=protocol, engine=engine)
    if as_json:
        print_json(metrics)
    else:
        console.print(render_metrics(metrics))


def export(
    run: Annotated[Path, typer.Argument(help="A trained run directory.")],
    format: Annotated[str, typer.Option("--format", help="onnx.")] = "onnx",
    quantize: Annotated[
        str | None, typer.Option(help="int8: also a statically quantized model, with the test accuracy it loses.")
    ] = None,
    calibration_images: Annotated[int, typer.Option(help="Training images that calibrate int8.")] = 300,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default 17).")] = None,
) -> None:
    """Export the model to RUN/export/model.onnx (ONNX Runtime serves it without PyTorch)."""
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.tasks.export import export_run, render_export

    meta = export_run(run, fmt=format, quantize=quantize, calibration_images=calibration_images, opset=opset)
    for line in render_export(meta, run):
        console.print(line, highlight=False)


def experiments_run(
    suite: Annotated[str, typer.Argument(help="seed-000, seed-001, ours or all (or a comma-separated config list).")],
    profile: ProfileOpt = None,
    data: Annotated[Path | None, typer.Option(help="Run every config on this dataset instead.")] = None,
    runs: RunsOpt = Path("runs"),
    set_: SetOpt = None,
) -> None:
    """Run a suite: finished runs are skipped, interrupted ones resumed; writes the comparison table."""
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.experiments import run_suite

    target: str | list[str] = suite if "," not in suite else [s for s in suite.split(",") if s]
    tables = run_suite(target, profile=profile, data=data, runs_root=runs, overrides=list(set_ or []), console=console)
    console.print(f"tables: [bold]{tables['markdown']}[/] and [bold]{tables['html']}[/]")
    if tables["failed"]:
        raise typer.Exit(1)


def demo(
    data: Annotated[
        Path | None, typer.Option(help="Run on this dataset instead of the built-in synthetic one.")
    ] = None,
    runs: Annotated[Path, typer.Option(help="Folder for the demo's run directories.")] = Path("runs"),
    epochs: Annotated[int | None, typer.Option(help="Override the number of epochs.")] = None,
) -> None:
    """Train a classifier and an embedding model, evaluate, index, search: the whole flow in minutes."""
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.demo import run_demo

    run_demo(console, data=data, runs_root=runs, epochs=epochs)


def report(
    runs_: Annotated[list[Path], typer.Argument(metavar="RUN...", help="One or more run directories.")],
    out: Annotated[Path | None, typer.Option(help="Cross-run page (default runs/report.html with 2+ runs).")] = None,
) -> None:
    """Write a self-contained HTML report per run (RUN/report/index.html), and one across runs."""
    # optional: matplotlib (the train extra), imported only when this runs
    from finegrain.report.html import write_multi_report, write_report
    from finegrain.runs import open_run

    paths = [open_run(r).path for r in runs_]
    for p in paths:
        console.print(f"report: [bold]{write_report(p)}[/]")
    if len(paths) > 1 or out is not None:
        dest = write_multi_report(paths, out or paths[0].parent / "report.html")
        console.print(f"comparison: [bold]{dest}[/]")


def configs() -> None:
    """List the shipped experiment configs."""

    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.config import CONFIG_DIR, load_raw, shipped_configs

    names = shipped_configs()
    if not names:  # an install without its package data: say so rather than print an empty table
        raise FinegrainError(f"no shipped configs found in {CONFIG_DIR}; this finegrain install is incomplete")
    table = Table(title=f"configs in {CONFIG_DIR}")
    table.add_column(
        "name", no_wrap=True
    )  # whole names, however narrow the terminal: `finegrain train NAME` takes them
    for col in ("task", "description", "profiles"):
        table.add_column(col)
    for n in names:
        raw = load_raw(CONFIG_DIR / f"{n}.yaml")
        table.add_row(
            n, raw.get("task", "classification"), raw.get("description", ""), ", ".join(raw.get("profiles", {}) or {})
        )
    console.print(table)
