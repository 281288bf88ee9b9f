"""``finegrain experiments run SUITE``: the catalogue, run in order, resumable, with one comparison table.

A finished run (trained to its end, ``state.json``, and evaluated after that: ``DONE`` +
a ``metrics.json`` that is not partial) is skipped; an interrupted one is resumed from its
last checkpoint (or only evaluated, when training ended but evaluation did not); kNN rows run after
the run whose model they use.
Every run gets its report, and the comparison table links each row to it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console

from finegrain.config import ExperimentConfig, data_override, load_config, profiles_of
from finegrain.errors import FinegrainError, unknown_name
from finegrain.report.tables import comparison_rows, html_table, markdown_table
from finegrain.runs import DEFAULT_RUNS_ROOT, RunDir, atomic_write_text

log = logging.getLogger(__name__)

SUITES: dict[str, list[str]] = {
    "seed-000": [
        "cars-tl-1",
        "cars-tl-2",
        "cars-tl-3",
        "cars-densenet121",
        "cars-knn-1",
        "cars-knn-2",
        "cars-knn-3",
        "cars-cnn-1",
        "cars-cnn-2",
        "cars-cnn-3",
    ],
    "seed-001": ["tin-cnn", "tin-resnet18", "tin-cubs-1", "tin-cubs-2", "tin-cubs-3", "cars196-ms"],
    "ours": [
        "cars-lite0",
        "cars-lite0-knn",
        "cars196-lite0-frozen",
        "cars196-lite0-ms",
        "cars196-lite0-nsm",
        "tin-ours",
    ],
}
SUITES["all"] = SUITES["seed-000"] + SUITES["seed-001"] + SUITES["ours"]


def suite_configs(suite: str) -> list[str]:
    if suite in SUITES:
        return SUITES[suite]
    raise unknown_name("suite", suite, list(SUITES))


def _source_exists(source: str, runs_root: Path) -> bool:
    """Whether a kNN row's ``eval.source_run`` names an existing run (as :func:`source_model` finds it)."""

    return any((p / "config.yaml").is_file() for p in (runs_root / source, Path(source), DEFAULT_RUNS_ROOT / source))


def plan(cfgs: list[ExperimentConfig], runs_root: Path) -> list[ExperimentConfig]:
    """The configs in the order they can run: a kNN row right after the run whose model it uses.

    Checked before anything runs, so a mistake in the 9th config does not surface hours in:
    two configs with one run name, and a kNN source run that is neither in the suite nor on disk.
    """
    names: set[str] = set()
    for cfg in cfgs:
        if cfg.name in names:
            raise FinegrainError(f"two configs of the suite write the same run '{cfg.name}'; give one another name")
        names.add(cfg.name)
    waiting: dict[str, list[ExperimentConfig]] = {}
    done: set[str] = set()
    order: list[ExperimentConfig] = []

    def emit(cfg: ExperimentConfig) -> None:
        order.append(cfg)
        done.add(cfg.name)
        for after in waiting.pop(cfg.name, []):
            emit(after)

    for cfg in cfgs:
        source = cfg.eval.source_run if not cfg.trains else None
        if source and source in names and source not in done:
            waiting.setdefault(source, []).append(cfg)
            continue
        if source and source not in names and not _source_exists(source, runs_root):
            raise FinegrainError(
                f"kNN row '{cfg.name}' uses the model of run '{source}', which is neither in the suite "
                f"nor in {runs_root}; run it first or add its config to the suite"
            )
        emit(cfg)
    for rest in waiting.values():  # a loop of kNN rows naming each other: keep the given order
        for cfg in rest:
            if cfg.name not in done:
                order.append(cfg)
                done.add(cfg.name)
    return order


def load_suite(
    suite: str | list[str], profile: str | None, data: Path | None, runs_root: Path, overrides: list[str] | None
) -> list[ExperimentConfig]:
    """Every config of the suite loaded and checked, in the order they can run (see :func:`plan`)."""
    names = suite_configs(suite) if isinstance(suite, str) else list(suite)
    if not names:
        raise FinegrainError("the suite names no configs")
    sets = list(overrides or [])
    if data is not None:
        sets.append(data_override(data))
    cfgs: list[ExperimentConfig] = []
    for name in names:
        prof = profile if profile and profile in profiles_of(name) else None
        if profile and prof is None:
            raise FinegrainError(f"config '{name}' has no '{profile}' profile")
        cfgs.append(load_config(name, profile=prof, overrides=sets))
    return plan(cfgs, runs_root)


def run_one(cfg: ExperimentConfig, runs_root: Path, failed: dict[str, str], console: Console) -> Path | None:
    """Train (or resume) and evaluate one run unless it is finished, then write its report.

    Returns the run's path, or None when it failed (its reason recorded in ``failed``) or its
    kNN source run did.
    """
    # Imported only now: a mistake in the suite is reported without waiting for torch and Lightning.
    from finegrain.report.html import report_is_current, write_report
    from finegrain.tasks.workflow import train_and_evaluate

    run = RunDir(runs_root / cfg.name)
    source = cfg.eval.source_run if not cfg.trains else None
    if source in failed:
        failed[cfg.name] = f"its source run '{source}' failed"
        return None
    if run.is_finished():
        console.print(f"[dim]{cfg.name}: finished, skipped[/]")
    else:
        resume = run.config_file.is_file()
        console.rule(f"[bold]{cfg.name}[/] — {cfg.description}" + (" (resumed)" if resume else ""))
        try:
            train_and_evaluate(cfg, runs_root, resume=resume or not cfg.trains)
        except FinegrainError as e:  # e.g. weights that cannot be downloaded: the other rows still run
            failed[cfg.name] = str(e)
            console.print(f"[red]{cfg.name} failed:[/] {e}")
            return None
    if not report_is_current(run.path):
        try:
            write_report(run.path)
        except Exception as e:  # noqa: BLE001 - a figure that fails must not lose the finished runs
            log.warning("%s: report failed: %s", run.path, e)
    return run.path


def write_tables(
    suite: str | list[str], finished: list[Path], failed: dict[str, str], runs_root: Path
) -> tuple[Path, Path]:
    """The suite's comparison table as ``runs_root/<suite>-results.md`` and ``.html``."""

    label = suite if isinstance(suite, str) else "custom"
    rows = comparison_rows(finished)
    md = runs_root / f"{label}-results.md"
    html = runs_root / f"{label}-results.html"
    title = f"Results of {label}" if isinstance(suite, str) else "Results"
    atomic_write_text(md, markdown_table(rows, title=title, failed=failed))
    atomic_write_text(html, html_table(rows, title=title, failed=failed))
    return md, html


def run_suite(
    suite: str | list[str],
    profile: str | None = None,
    data: Path | None = None,
    runs_root: Path = Path("runs"),
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> dict:
    """Run every config of a suite (skipping finished runs) and write the comparison table.

    Every config is loaded and checked before the first run starts. Each run gets its
    report (``<run>/report/index.html``), which the table's rows link to. A run that fails
    with a :class:`FinegrainError` (say, ImageNet weights that cannot be downloaded) is
    listed with its reason under the tables and the suite goes on. Returns the paths of the
    Markdown and HTML tables (``markdown``, ``html``: ``runs_root/<suite>-results.md`` /
    ``.html``) and the failed runs with their reasons (``failed``).
    """
    console = console or Console()
    cfgs = load_suite(suite, profile, data, runs_root, overrides)
    finished: list[Path] = []
    failed: dict[str, str] = {}
    for cfg in cfgs:
        path = run_one(cfg, runs_root, failed, console)
        if path is not None:
            finished.append(path)
    md, html = write_tables(suite, finished, failed, runs_root)
    if failed:
        console.print(
            f"[red]{len(failed)} of {len(cfgs)} runs failed[/] (listed under the tables): " + ", ".join(failed)
        )
    return {"markdown": md, "html": html, "failed": failed}
