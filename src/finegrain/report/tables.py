"""Comparison tables across runs: one row per finished run, as Markdown and as a self-contained HTML page.

The columns follow the seed documents' summary tables (Model, Loss, Accuracy,
F1, Precision, Recall, Prediction time) with a second table for retrieval runs
(Recall@1/2/4/8, MAP@R), each ending with the images a run was tested on (its test split,
a holdout or held-out classes, with their count). Under each table a "Data and protocol" list says which
data and which evaluation protocol produced each row, read from ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from finegrain.report.page_parts import render
from finegrain.runs import RunDir

log = logging.getLogger(__name__)

MISSING = "—"
RECALL_KS = (1, 2, 4, 8)

CLASSIFICATION_COLUMNS: list[tuple[str, str, str]] = [
    # (header, row key, kind)
    ("Loss", "loss", "loss"),
    ("Accuracy", "accuracy", "pct"),
    ("F1", "f1", "pct"),
    ("Precision", "precision", "pct"),
    ("Recall", "recall", "pct"),
    ("Prediction time (s)", "prediction_seconds", "seconds"),
    ("Tested on", "tested_on", "text"),
]
RETRIEVAL_COLUMNS: list[tuple[str, str, str]] = [
    *[(f"Recall@{k}", f"recall@{k}", "pct") for k in RECALL_KS],
    ("MAP@R", "map@r", "pct"),
    ("Tested on", "tested_on", "text"),
]


# ---------------------------------------------------------------- formatting


def _num(v: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def fmt_pct(v: Any) -> str:
    """A fraction in [0, 1] as a percentage with one decimal: ``0.4237 -> '42.4%'``."""
    f = _num(v)
    return MISSING if f is None else f"{100 * f:.1f}%"


def fmt_loss(v: Any) -> str:
    f = _num(v)
    return MISSING if f is None else f"{f:.3f}"


def fmt_seconds(v: Any) -> str:
    f = _num(v)
    if f is None:
        return MISSING
    return f"{f:.1f}" if f >= 100 else f"{f:.3f}"


def fmt_value(v: Any, kind: str) -> str:
    return {"pct": fmt_pct, "loss": fmt_loss, "seconds": fmt_seconds, "text": fmt_text}[kind](v)


def fmt_text(v: Any) -> str:
    return MISSING if v in (None, "") else str(v)


def tested_on_label(tested_on: Any) -> str:
    """The table label of a ``metrics.json`` ``tested_on`` record (``test split (8,041)``, ``holdout
    (4,072)``, ``held-out classes (4,092)``); runs evaluated before it existed: ``not recorded``."""
    if not isinstance(tested_on, dict) or not tested_on.get("source"):
        return "not recorded"
    n = tested_on.get("images")
    return f"{tested_on['source']} ({n:,})" if isinstance(n, int) else str(tested_on["source"])


# ---------------------------------------------------------------- protocol in words


def data_words(protocol: dict) -> str:
    """``'stanford_cars (stanford_cars_devkit)'``: the dataset folder name and its format.

    ``auto`` (the format was detected, not named) says nothing, so it is left out; the
    split sentence of :func:`protocol_words` names the detected layout.
    """
    dataset = str(protocol.get("dataset") or "").rstrip("/\\")
    name = Path(dataset).name if dataset else ""
    fmt = protocol.get("format")
    fmt = None if fmt == "auto" else fmt
    if name and fmt and fmt != name:
        return f"{name} ({fmt})"
    return name or (str(fmt) if fmt else MISSING)


def _synthetic_words(cfg: Any, protocol: dict) -> str:
    """The built-in synthetic dataset named as such (its folder is a hash under the cache)."""
    s = cfg.data.synthetic
    ncls = protocol.get("num_classes") or s.num_classes
    return f"built-in synthetic dataset ({ncls} classes, seed {s.seed})"


def sizes_words(trained: list[int], tested: list[list[int]]) -> str:
    """``192×256 (H×W)``, or with other test sizes ``192×256 (H×W), tested at 192×256 and
    256×341 (outputs averaged)``."""
    text = f"{trained[0]}×{trained[1]} (H×W)"
    if tested and tested != [trained]:
        text += (
            ", tested at "
            + " and ".join(f"{h}×{w}" for h, w in tested)
            + (" (outputs averaged)" if len(tested) > 1 else "")
        )
    return text


def protocol_words(protocol: dict) -> str:
    """The evaluation protocol of a ``metrics.json`` as one or two sentences."""
    if not protocol:
        return "protocol not recorded"
    parts: list[str] = []
    split = str(protocol.get("split") or "").strip()
    kind = protocol.get("protocol")
    if split:
        parts.append(split if split.endswith(".") else split + ".")
    else:
        counts = ", ".join(
            f"{protocol[k]} {k.removeprefix('n_')}"
            for k in ("n_train", "n_val", "n_test")
            if protocol.get(k) is not None
        )
        what = {"retrieval": "Class-disjoint retrieval", "classification": "Classification"}.get(str(kind), str(kind))
        ncls = protocol.get("num_classes")
        parts.append(f"{what}" + (f" ({ncls} classes)" if ncls else "") + (f": {counts} images." if counts else "."))
    if kind == "retrieval":
        q, g = protocol.get("queries"), protocol.get("gallery")
        if q or g:
            parts.append(f"Queries: {q or 'not recorded'}; gallery: {g or 'not recorded'}.")
    method = protocol.get("method")
    if method:
        parts.append(f"Prediction: {method}.")
    size = protocol.get("image_size")
    tested = [list(t) for t in protocol.get("eval_image_sizes") or ([size] if size else [])]
    if tested and all(isinstance(t, list) and len(t) == 2 for t in tested):
        trained = protocol.get("train_image_size") or tested[0]
        parts.append(
            "Images resized to "
            + sizes_words(list(trained), tested)
            + (", horizontal-flip test-time augmentation." if protocol.get("tta_flip") else ".")
        )
    return " ".join(parts)


# ---------------------------------------------------------------- rows


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("cannot read %s: %s", path, e)
        return {}


def _config_of(run: RunDir) -> Any | None:
    try:
        return run.load_config()
    except Exception as e:  # noqa: BLE001 - a report never fails on one bad config
        log.warning("%s: cannot read config.yaml: %s", run.path, e)
        return None


def run_row(run_path: Path) -> dict:
    """The comparison row of one run directory that has a ``metrics.json``."""
    run = RunDir(Path(run_path))
    metrics = _read_json(run.metrics) if run.metrics.is_file() else {}
    cfg = _config_of(run)
    protocol = metrics.get("protocol") or {}
    cls = metrics.get("classification") or {}
    ret = metrics.get("retrieval") or {}
    row: dict[str, Any] = {
        "name": metrics.get("run") or (cfg.name if cfg else run.name),
        "description": (cfg.description if cfg else "") or "",
        "task": metrics.get("task") or (cfg.task if cfg else None),
        "data": (
            _synthetic_words(cfg, protocol)
            if cfg is not None and cfg.data.root == "synthetic"
            else data_words(protocol)
            if protocol
            else data_words({"dataset": cfg.data.root, "format": cfg.data.format})
            if cfg
            else MISSING
        ),
        "protocol": protocol_words(protocol),
        "protocol_kind": protocol.get("protocol") or ("retrieval" if ret else "classification"),
        "loss": _num(cls.get("loss")),
        "accuracy": _num(cls.get("top1")),
        "top5": _num(cls.get("top5")),
        "f1": _num(cls.get("f1_macro")),
        "precision": _num(cls.get("precision_macro")),
        "recall": _num(cls.get("recall_macro")),
        "prediction_seconds": _num(cls.get("prediction_seconds")),
        **{f"recall@{k}": _num(ret.get(f"recall@{k}")) for k in RECALL_KS},
        "map@r": _num(ret.get("map@r")),
        "n_test": protocol.get("n_test"),
        "tested_on": tested_on_label(metrics.get("tested_on")) if metrics else None,
        "report": f"{run.name}/report/index.html",
        "path": str(run.path),
    }
    row["has_classification"] = bool(cls)
    row["has_retrieval"] = bool(ret)
    row["partial"] = partial_words(run, metrics)
    return row


def partial_words(run: RunDir, metrics: dict) -> str | None:
    """``partial: 3 of 40 epochs`` when the metrics are of a model whose training did not finish, else None."""
    if "partial" in metrics:
        if not metrics["partial"]:
            return None
        done, planned = metrics.get("epochs_done"), metrics.get("epochs_planned")
    else:  # evaluated before metrics.json said so: judge by the run's training state
        state = run.training_state()
        if state["status"] == "finished":
            return None
        done, planned = state["epochs_done"], state["epochs_planned"]
    return f"partial: {done} of {planned} epochs" if planned else "partial"


def comparison_rows(run_paths: list[Path]) -> list[dict]:
    """One row per evaluated run (with a ``metrics.json``), in the order given; a run evaluated before
    its training finished has ``partial`` set (``partial: 3 of 40 epochs``) and is labelled so.

    Keys: name, description, task, data, protocol (in words), loss, accuracy (top-1),
    f1 / precision / recall (macro), prediction_seconds, recall@1/2/4/8, map@r
    (None where not applicable), report (``<run>/report/index.html``, relative to the
    runs folder), plus protocol_kind, top5, n_test, path, has_classification, has_retrieval.
    Metric values are fractions in [0, 1]; seconds are wall time.
    """
    rows = []
    for p in run_paths:
        run = RunDir(Path(p))
        if not run.metrics.is_file():
            log.info("%s is not evaluated (no metrics.json); left out of the table", run.path)
            continue
        rows.append(run_row(run.path))
    return rows


def _split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(classification-table rows, retrieval-table rows)."""
    ret = [
        r
        for r in rows
        if r.get("has_retrieval") or any(r.get(k) is not None for _, k, kind in RETRIEVAL_COLUMNS if kind != "text")
    ]
    cls = [
        r
        for r in rows
        if r not in ret
        or r.get("has_classification")
        or any(r.get(k) is not None for _, k, kind in CLASSIFICATION_COLUMNS if kind != "text")
    ]
    return cls, ret


# ---------------------------------------------------------------- Markdown


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _model_label(row: dict) -> str:
    desc = (row.get("description") or "").strip()
    name = f"**{row['name']}**" + (f" (*{row['partial']}*)" if row.get("partial") else "")
    return f"{name} — {desc}" if desc else name


def _md_link(target: str) -> str:
    """A Markdown link target: spaces and parentheses would end it early."""
    return target.replace(" ", "%20").replace("(", "%28").replace(")", "%29")


def _md_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    lines = [
        "| Model | " + " | ".join(h for h, _, _ in columns) + " |",
        "|:--|" + "|".join("--:" for _ in columns) + "|",
    ]
    for r in rows:
        label = _model_label(r) + (f" ([report]({_md_link(str(r['report']))}))" if r.get("report") else "")
        cells = [_md_cell(label)] + [fmt_value(r.get(k), kind) for _, k, kind in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _md_protocol_list(rows: list[dict]) -> list[str]:
    lines = ["**Data and protocol**", ""]
    for r in rows:
        lines.append(
            f"- **{_md_cell(r['name'])}** ({r.get('task') or MISSING}): data {r.get('data') or MISSING}. "
            f"{_md_cell(r.get('protocol') or '')}"
        )
    return lines


def markdown_table(rows: list[dict], title: str = "Results", failed: dict[str, str] | None = None) -> str:
    """The comparison as Markdown: a classification table, a retrieval table when
    retrieval rows exist, and under each a "Data and protocol" list.

    Accuracies and recalls are percentages with one decimal, loss has three
    decimals, prediction time is in seconds; "—" marks a value that does not apply.
    Each row's model cell links to the run's report (``row["report"]``).
    """
    out = [f"# {title}", ""]
    tail = ["## Not run", ""] + [f"- {name}: {reason}" for name, reason in failed.items()] + [""] if failed else []
    if not rows:
        return "\n".join(out + ["No finished runs.", ""] + tail)
    cls, ret = _split_rows(rows)
    if cls:
        out += ["## Classification", ""] + _md_table(cls, CLASSIFICATION_COLUMNS) + [""]
        out += [
            "Accuracy is top-1; F1, precision and recall are macro averages over classes; "
            "prediction time is the wall time of the model (or kNN search) over all test images.",
            "",
        ]
        out += _md_protocol_list(cls) + [""]
    if ret:
        out += ["## Retrieval", ""] + _md_table(ret, RETRIEVAL_COLUMNS) + [""]
        out += [
            "Recall@K: fraction of queries with at least one same-class image among their K nearest "
            "neighbours (query excluded); MAP@R as in Musgrave et al. 2020.",
            "",
        ]
        out += _md_protocol_list(ret) + [""]
    return "\n".join(out + tail)


# ---------------------------------------------------------------- HTML

CLASSIFICATION_NOTE = (
    "Accuracy is top-1; F1, precision and recall are macro averages over classes; prediction time (seconds) "
    "is the wall time of the model (or kNN search) over all test images. “—” marks a value that does not apply."
)
RETRIEVAL_NOTE = (
    "Recall@K: fraction of queries with at least one same-class image among their K nearest neighbours "
    "(query excluded); MAP@R as in Musgrave et al. 2020."
)


def _html_rows(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    return [
        {
            "name": str(r["name"]),
            "report": r.get("report") or "",
            "partial": r.get("partial") or "",
            "description": r.get("description") or "",
            "cells": [fmt_value(r.get(k), kind) for _, k, kind in columns],
            "task": r.get("task") or MISSING,
            "data": r.get("data") or MISSING,
            "protocol": r.get("protocol") or "",
        }
        for r in rows
    ]


def html_tables(rows: list[dict]) -> list[dict[str, Any]]:
    """The comparison tables as the values ``parts.html.j2``'s ``comparison`` lays out: a
    classification table and a retrieval table where there are such rows."""
    cls, ret = _split_rows(rows)
    tables = []
    for heading, these, columns, note in (
        ("Classification", cls, CLASSIFICATION_COLUMNS, CLASSIFICATION_NOTE),
        ("Retrieval", ret, RETRIEVAL_COLUMNS, RETRIEVAL_NOTE),
    ):
        if these:
            headers = [h for h, _, _ in columns]
            tables.append({"heading": heading, "headers": headers, "rows": _html_rows(these, columns), "note": note})
    return tables


def html_table(rows: list[dict], title: str = "Results", failed: dict[str, str] | None = None) -> str:
    """The comparison as a self-contained HTML page; each run's name links to its report."""
    return render("results.html.j2", title=title, tables=html_tables(rows), failed=failed or {})
