"""``finegrain experiments run SUITE``: the catalogue, run in order, resumable, with one comparison table.

A finished run (``DONE`` + ``metrics.json``) is skipped; an interrupted one is
resumed from its last checkpoint; kNN rows run after the run whose model they use.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console

from finegrain.config import load_config, profiles_of
from finegrain.errors import FinegrainError, unknown_name
from finegrain.runs import RunDir, atomic_write_text

log = logging.getLogger(__name__)

SUITES: dict[str, list[str]] = {
    "seed-000": ["cars-tl-1", "cars-tl-2", "cars-tl-3", "cars-densenet121", "cars-knn-1", "cars-knn-2",
                 "cars-knn-3", "cars-cnn-1", "cars-cnn-2", "cars-cnn-3"],
    "seed-001": ["tin-cnn", "tin-resnet18", "tin-cubs-1", "tin-cubs-2", "tin-cubs-3", "cars196-ms"],
    "ours": ["cars-lite0", "cars-lite0-knn", "cars196-lite0-frozen", "cars196-lite0-ms", "tin-ours"],
}
SUITES["all"] = SUITES["seed-000"] + SUITES["seed-001"] + SUITES["ours"]


def suite_configs(suite: str) -> list[str]:
    if suite in SUITES:
        return SUITES[suite]
    raise unknown_name("suite", suite, list(SUITES))


def run_suite(
    suite: str | list[str],
    profile: str | None = None,
    data: Path | None = None,
    runs_root: Path = Path("runs"),
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> dict[str, Path]:
    """Run every config of a suite (skipping finished runs) and write the comparison table.

    Returns the paths of the Markdown and HTML tables.
    """
    from finegrain.report.tables import comparison_rows, html_table, markdown_table
    from finegrain.tasks.engine import fit
    from finegrain.tasks.evaluate import evaluate_run

    console = console or Console()
    names = suite_configs(suite) if isinstance(suite, str) else list(suite)
    sets = list(overrides or [])
    if data is not None:
        sets.append(f"data.root={data}")
    finished: list[Path] = []
    for name in names:
        prof = profile if profile and profile in profiles_of(name) else None
        if profile and prof is None:
            raise FinegrainError(f"config '{name}' has no '{profile}' profile")
        cfg = load_config(name, profile=prof, overrides=sets)
        run = RunDir(runs_root / cfg.name)
        if run.is_finished():
            console.print(f"[dim]{cfg.name}: finished, skipped[/]")
            finished.append(run.path)
            continue
        console.rule(f"[bold]{cfg.name}[/] — {cfg.description}")
        if cfg.task == "knn":
            from finegrain.runs import create_run

            create_run(cfg, runs_root, resume=True)
        else:
            fit(cfg, runs_root=runs_root, resume=run.config_file.is_file())
        evaluate_run(run.path)
        finished.append(run.path)
    label = suite if isinstance(suite, str) else "custom"
    rows = comparison_rows(finished)
    md = runs_root / f"{label}-results.md"
    html = runs_root / f"{label}-results.html"
    atomic_write_text(md, markdown_table(rows))
    atomic_write_text(html, html_table(rows))
    return {"markdown": md, "html": html}
