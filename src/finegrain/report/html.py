"""Self-contained HTML reports: one page per run, and an index page across runs.

Every figure is written as a PNG next to the page *and* embedded in it as a
base64 ``data:`` URI, so ``report/index.html`` can be mailed or copied alone.
A figure whose inputs are missing is skipped, and the page says which file
was missing.

The page is assembled here from :mod:`finegrain.report.run_inputs` (what a run's
report is drawn from), :mod:`finegrain.report.run_sections` (its sections) and
:mod:`finegrain.report.page_parts` (stylesheet, escaping, embedded figures).
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from finegrain.report import figures
from finegrain.report.explain_figure import explain_section
from finegrain.report.page_parts import REPORT_CSS, esc, png_data_uri
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
from finegrain.report.tables import comparison_rows, html_page, html_tables_fragment
from finegrain.runs import RunDir, atomic_write_text

__all__ = [
    "PRETTY",
    "REPORT_CSS",
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
    body = [header_section(inp), metrics_or_note(inp)]
    body += training_section(inp)
    body += confused_section(inp)
    body += per_class_section(inp)
    body += retrieval_section(inp)
    body += explain_section(inp)
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    body.append(f"<footer>finegrain report of <code>{esc(inp.run.path)}</code>, generated {generated}.</footer>")
    page = html_page(f"{inp.title} — finegrain report", "\n".join(body), REPORT_CSS)
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
        img = (
            f'<a href="{esc(r["report"])}"><img src="{png_data_uri(png)}" '
            f'alt="learning curves of {esc(r["name"])}"></a>'
            if run.history.is_file() and png.is_file()
            else '<p class="skipped">no history.csv</p>'
        )
        cards.append(
            f'<div class="card"><h3><a href="{esc(r["report"])}">{esc(r["name"])}</a></h3>'
            f'<div class="desc">{esc(r.get("description") or "")}</div>{img}</div>'
        )
    unfinished = [p for p in run_paths if p not in finished]
    body = [
        f"<h1>{esc(title)}</h1>",
        html_tables_fragment(rows),
        "<h2>Learning curves</h2>",
        f'<div class="cards">{"".join(cards)}</div>' if cards else "<p>No finished runs.</p>",
    ]
    if unfinished:
        body.append(
            "<h2>Not evaluated</h2><ul>"
            + "".join(f"<li><code>{esc(p)}</code>: no metrics.json</li>" for p in unfinished)
            + "</ul>"
        )
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    body.append(f"<footer>finegrain comparison of {len(rows)} run(s), generated {generated}.</footer>")
    atomic_write_text(out_html, html_page(title, "\n".join(body), REPORT_CSS))
    return out_html
