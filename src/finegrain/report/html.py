"""Self-contained HTML reports: one page per run, and an index page across runs.

Every figure is written as a PNG next to the page *and* embedded in it as a
base64 ``data:`` URI, so ``report/index.html`` can be mailed or copied alone.
A figure whose inputs are missing is skipped, and the page says which file
was missing.

The page is assembled here from :mod:`finegrain.report.run_inputs` (what a run's
report is drawn from), :mod:`finegrain.report.run_sections` (its sections) and
:mod:`finegrain.report.page_parts` (embedded figures and the templates under ``templates/``,
which lay the pages out and escape every value: Jinja2 with autoescape).
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from finegrain.report import figures
from finegrain.report.explain_figure import explain_section
from finegrain.report.page_parts import png_data_uri, render
from finegrain.report.run_inputs import (
    examples_by_class,
    logged_class_names,
    names_from_folders,
    per_class_names,
    read_run_inputs,
)
from finegrain.report.run_sections import (
    PRETTY,
    confused_section,
    definition_for,
    format_metric,
    header_section,
    metrics_or_note,
    per_class_section,
    retrieval_section,
    training_section,
)
from finegrain.report.tables import comparison_rows, html_tables
from finegrain.runs import RunDir, atomic_write_text

__all__ = [
    "PRETTY",
    "REPORT_INPUTS",
    "definition_for",
    "examples_by_class",
    "format_metric",
    "logged_class_names",
    "names_from_folders",
    "per_class_names",
    "png_data_uri",
    "report_is_current",
    "write_multi_report",
    "write_report",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the run report


def write_report(run_path: Path, class_names: list[str] | None = None) -> Path:
    """Write ``<run>/report/index.html`` (self-contained) and its PNG figures; return the page's path.

    ``class_names`` (index = label) names the classes of the embeddings; by default
    they are read from per_class.csv's row order, else from the names training logged,
    else from the images' folders; failing all, labels are shown as numbers.
    """
    inp = read_run_inputs(run_path, class_names)
    page = render(
        "run_report.html.j2",
        **header_section(inp),
        metrics=metrics_or_note(inp),
        training=training_section(inp),
        confused=confused_section(inp),
        per_class=per_class_section(inp),
        retrieval=retrieval_section(inp),
        explained=explain_section(inp),
        run_path=str(inp.run.path),
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    out = inp.out_dir / "index.html"
    atomic_write_text(out, page)
    return out


# ---------------------------------------------------------------- across runs

REPORT_INPUTS = ("config.yaml", "history.csv", "metrics.json", "per_class.csv", "embeddings/test.npz")


def report_is_current(run_path: Path) -> bool:
    """True when ``<run>/report/index.html`` exists and is newer than every input it was drawn from."""
    run = RunDir(Path(run_path))
    page = run.report / "index.html"
    if not page.is_file():
        return False
    built = page.stat().st_mtime
    return all(not (run.path / f).is_file() or (run.path / f).stat().st_mtime <= built for f in REPORT_INPUTS)


def write_multi_report(
    run_paths: list[Path], out_html: Path, title: str = "Runs compared", run_reports: bool = True
) -> Path:
    """An index page across runs: the comparison table (names linking to each run's report),
    then one card per run with its learning-curve thumbnail. Returns ``out_html``.

    With ``run_reports`` each finished run's own report is written first when it is missing or
    older than its inputs (see :func:`report_is_current`), so every link works.
    """
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    run_paths = [Path(p) for p in run_paths]
    rows = comparison_rows(run_paths)
    finished = {Path(r["path"]) for r in rows}
    for r in rows:
        run = RunDir(Path(r["path"]))
        if run_reports and not report_is_current(run.path):
            try:
                write_report(run.path)
            except Exception as e:  # noqa: BLE001
                log.warning("%s: report failed: %s", run.path, e)
        r["report"] = Path(os.path.relpath(run.report / "index.html", out_html.parent)).as_posix()

    cards = []
    for r in rows:
        run = RunDir(Path(r["path"]))
        png = run.report / "learning_curves.png"
        if run.history.is_file() and not (png.is_file() and png.stat().st_mtime >= run.history.stat().st_mtime):
            try:
                figures.learning_curves(run.history, png)
            except Exception as e:  # noqa: BLE001
                log.warning("%s: learning curves failed: %s", run.path, e)
        uri = png_data_uri(png) if run.history.is_file() and png.is_file() else ""
        cards.append(
            {"report": r["report"], "name": str(r["name"]), "description": r.get("description") or "", "uri": uri}
        )
    page = render(
        "runs_index.html.j2",
        title=title,
        tables=html_tables(rows),
        cards=cards,
        unfinished=[str(p) for p in run_paths if p not in finished],
        n_runs=len(rows),
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    atomic_write_text(out_html, page)
    return out_html
