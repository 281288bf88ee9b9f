"""Self-contained HTML reports: one page per run, and an index page across runs.

Every figure is written as a PNG next to the page *and* embedded in it as a
base64 ``data:`` URI, so ``report/index.html`` can be mailed or copied alone.
A figure whose inputs are missing is skipped, and the page says which file
was missing.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.report import figures
from finegrain.report.tables import (
    MISSING,
    comparison_rows,
    data_words,
    fmt_seconds,
    html_page,
    html_tables_fragment,
    protocol_words,
    sizes_words,
)
from finegrain.runs import RunDir, atomic_write_text

log = logging.getLogger(__name__)

REPORT_CSS = """
header { border-bottom: 2px solid #1a5fb4; margin-bottom: 1em; padding-bottom: .5em; }
header .desc { font-size: 1.05em; color: #444; margin: .2em 0 .6em; }
table.kv { border-collapse: collapse; font-size: .93em; }
table.kv th { text-align: left; padding: .2em 1.2em .2em 0; color: #555; font-weight: 500; vertical-align: top; }
table.kv td { padding: .2em 1.2em .2em 0; }
table.metrics { border-collapse: collapse; font-size: .93em; margin: .5em 0; }
table.metrics th, table.metrics td { border-bottom: 1px solid #ddd; padding: .3em .7em; text-align: left;
                                     vertical-align: top; }
table.metrics td.value { text-align: right; font-variant-numeric: tabular-nums; font-weight: 600;
                         white-space: nowrap; }
table.metrics td.def { color: #555; font-size: .92em; }
table.metrics th { background: #f3f5f8; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; margin-top: .3em; }
p.skipped { color: #8a6d3b; background: #fcf8e3; padding: .4em .7em; border-left: 3px solid #e0c36b; }
details { margin: .6em 0; } summary { cursor: pointer; color: #1a5fb4; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 1em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6em .8em; }
.card h3 { margin: .1em 0 .3em; font-size: 1.05em; }
.card img { width: 100%; height: auto; }
.card .desc { color: #555; font-size: .9em; }
footer { margin-top: 2.5em; color: #777; font-size: .85em; border-top: 1px solid #ddd; padding-top: .5em; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def png_data_uri(path: Path) -> str:
    """``data:image/png;base64,...`` of a PNG file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _figure_html(png: Path, alt: str, caption: str) -> str:
    return (f'<figure><img src="{png_data_uri(png)}" alt="{_esc(alt)}">'
            f"<figcaption>{_esc(caption)} Also saved as <code>{_esc(png.name)}</code>.</figcaption></figure>")


def _skipped(what: str, why: str) -> str:
    return f'<p class="skipped"><b>{_esc(what)}</b>: not drawn — {_esc(why)}.</p>'


# ---------------------------------------------------------------- inputs

def _read_metrics(run: RunDir) -> dict | None:
    if not run.metrics.is_file():
        return None
    try:
        return json.loads(run.metrics.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable metrics.json: %s", run.path, e)
        return None


def _load_config(run: RunDir):
    try:
        return run.load_config()
    except Exception as e:  # noqa: BLE001 - the report shows what it can
        log.warning("%s: no usable config.yaml: %s", run.path, e)
        return None


def per_class_names(per_class_csv: Path) -> list[str] | None:
    """Class names in class-index order: the row order of per_class.csv."""
    if not per_class_csv.is_file():
        return None
    with per_class_csv.open(newline="") as f:
        names = [r.get("class") or "" for r in csv.DictReader(f)]
    return names or None


def logged_class_names(run_dir: Path) -> list[str] | None:
    """Class names in class-index order as training logged them (``logs/hparams.yaml``)."""
    path = run_dir / "logs" / "hparams.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        names = (yaml.safe_load(path.read_text()) or {}).get("class_names")
    except yaml.YAMLError:
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def names_from_folders(labels: np.ndarray, paths: list[str]) -> list[str] | None:
    """Class names from an image-folder layout: each label's most common parent folder name,
    used only when it covers at least 90% of that label's images and labels get distinct names."""
    from collections import Counter

    if not len(labels):
        return None
    counts: dict[int, Counter] = {}
    for lab, p in zip(np.asarray(labels).tolist(), paths):
        counts.setdefault(int(lab), Counter())[Path(p).parent.name] += 1
    folder = {}
    for lab, c in counts.items():
        name, n = c.most_common(1)[0]
        if n < 0.9 * sum(c.values()):
            return None
        folder[lab] = name
    if len(set(folder.values())) != len(folder) or min(folder) < 0:
        return None
    return [folder.get(i, f"class {i}") for i in range(max(folder) + 1)]


def _load_embeddings(npz: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    if not npz.is_file():
        return None
    try:
        with np.load(npz, allow_pickle=False) as z:
            return np.asarray(z["embeddings"]), np.asarray(z["labels"]), [str(p) for p in z["paths"]]
    except Exception as e:  # noqa: BLE001
        log.warning("%s: unreadable embeddings: %s", npz, e)
        return None


def _resolver(run: RunDir):
    """Image paths are stored as the evaluation saw them (absolute, or relative to where it ran)."""
    bases = [Path.cwd(), run.path.parent.parent, run.path.parent, run.path]

    def resolve(p: str) -> Path:
        q = Path(p)
        if q.is_absolute() or q.exists():
            return q
        for b in bases:
            if (b / q).exists():
                return b / q
        return q

    return resolve


def examples_by_class(wanted: list[str], labels: np.ndarray | None, paths: list[str] | None,
                      class_names: list[str] | None, per_class: int = 2, resolve=Path) -> dict[str, list[Path]]:
    """Up to ``per_class`` example image paths for each wanted class name: by label (through
    ``class_names``), else by the image's parent folder name."""
    out: dict[str, list[Path]] = {}
    if labels is None or paths is None:
        return out
    index = {n: i for i, n in enumerate(class_names or [])}
    for name in wanted:
        if name in out:
            continue
        if name in index:
            hits = np.flatnonzero(labels == index[name])
            chosen = [paths[i] for i in hits[:per_class]]
        else:
            chosen = [p for p in paths if Path(p).parent.name == name][:per_class]
        out[name] = [resolve(p) for p in chosen]
    return out


# ---------------------------------------------------------------- sections

def _config_brief(cfg, metrics: dict | None) -> list[tuple[str, str]]:
    if cfg is None:
        return [("config", "config.yaml missing or invalid")]
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    head = m.head + (f" ({m.embedding_dim}-d embedding{', L2-normalised' if m.normalize_embedding else ''})"
                     if m.head != "classifier" else "")
    if m.dropout:
        head += f", dropout {m.dropout}"
    backbone = m.backbone
    if m.cubs != "none":
        backbone += f" + {m.cubs} on stage(s) {', '.join(map(str, m.cubs_stages))}"
    if m.freeze != "none":
        backbone += f" (frozen: {m.freeze})"
    if m.freeze_stages:
        backbone += f" (stem and first {m.freeze_stages} stages frozen)"
    opt = o.name + (f", weight decay {o.weight_decay:g}" if o.weight_decay else "")
    if o.name == "sgd":
        opt += f", momentum {o.momentum:g}{' (Nesterov)' if o.nesterov else ''}"
    lr = f"{o.lr:g}" + (f" (backbone × {o.backbone_lr_mult:g})" if o.backbone_lr_mult != 1 else "")
    sch = cfg.schedule
    if sch.name == "step":
        lr += f"; StepLR γ={sch.gamma:g} every {sch.step_size} epochs"
    elif sch.name != "none":
        lr += f"; {sch.name} schedule" + (f", {sch.warmup_epochs:g} warm-up epoch{'' if sch.warmup_epochs == 1 else 's'}"
                                             if sch.warmup_epochs else "")
    aug = d.augment + "".join(f", {k} {v:g}" for k, v in (("mixup", t.mixup), ("cutmix", t.cutmix)) if v)
    epochs = f"{t.epochs}" + (f" (first {t.head_epochs} head only)" if t.head_epochs else "")
    size = list(d.image_size)
    tested = [list(t) for t in ((metrics or {}).get("protocol", {}).get("eval_image_sizes") or d.eval_image_sizes)]
    rows = [
        ("task", cfg.task),
        ("data", f"{d.root} (format {d.format}, protocol {d.protocol})"),
        ("backbone", backbone),
        ("weights", m.weights),
        ("head", head),
        ("image size", sizes_words(size, tested)),
        ("epochs", epochs),
        ("optimiser", opt),
        ("learning rate", lr),
        ("batch size", f"{d.batch_size}" + (f", sampler {d.sampler} (m={d.m_per_class})"
                                            if d.sampler == "m_per_class" else "")),
        ("augmentation", aug),
        ("loss", cfg.loss.name + "".join(f", {k.replace('_', ' ')} {v:g}" for k, v in cfg.loss.model_dump().items()
                                         if k != "name" and isinstance(v, (int, float)) and v)),
        ("precision", t.precision),
    ]
    if not cfg.trains:
        e = cfg.eval
        rows.append(("kNN", f"k={e.k}, {e.metric}, {e.weights} votes, embeddings of run {e.source_run}"))
    return rows


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return '<table class="kv">' + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows) + \
        "</table>"


def definition_for(key: str, definitions: dict[str, str]) -> str:
    """The definition text of a metric key, matching grouped keys such as
    ``precision/recall/f1_macro`` or ``precision@1 / r_precision / map@r``."""
    if key in definitions:
        return definitions[key]
    if key.startswith("recall@") and "recall@k" in definitions:
        return definitions["recall@k"]
    for dk, text in definitions.items():
        parts = [p.strip() for p in dk.split("/")]
        names = set(parts)
        last = parts[-1]
        if "_" in last and len(parts) > 1:
            suffix = "_" + last.split("_", 1)[1]
            names |= {p + suffix for p in parts[:-1]}
        if key in names:
            return text
    return ""


PRETTY = {
    "top1": "top-1 accuracy", "top5": "top-5 accuracy", "loss": "loss",
    "precision_macro": "precision (macro)", "recall_macro": "recall (macro)", "f1_macro": "F1 (macro)",
    "precision_weighted": "precision (weighted)", "recall_weighted": "recall (weighted)",
    "f1_weighted": "F1 (weighted)", "n": "test images", "prediction_seconds": "prediction time",
    "n_gallery": "gallery images", "n_queries": "queries", "map@r": "MAP@R", "r_precision": "R-precision",
    "precision@1": "precision@1", "nmi": "NMI",
}


def format_metric(key: str, v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return MISSING if v is None else str(v)
    if isinstance(v, int) or (key.startswith("n") and isinstance(v, float) and v.is_integer() and key != "nmi"):
        return f"{int(v):,}"
    if isinstance(v, float):
        if "seconds" in key:
            return f"{fmt_seconds(v)} s"
        if "loss" in key:
            return f"{v:.4f}"
        if key == "nmi":
            return f"{v:.4f}"
        return f"{100 * v:.2f}%"
    return str(v)


def _metrics_section(metrics: dict) -> str:
    kind = "classification" if "classification" in metrics else "retrieval" if "retrieval" in metrics else None
    proto = metrics.get("protocol") or {}
    defs = metrics.get("definitions") or {}
    parts = ["<h2>Test metrics</h2>"]
    if metrics.get("partial"):
        parts.append(f'<p class="partial"><b>Partial:</b> evaluated after {_esc(metrics.get("epochs_done"))} of '
                     f'{_esc(metrics.get("epochs_planned"))} training epochs; training had not finished.</p>')
    if kind is None:
        parts.append("<p>metrics.json has no classification or retrieval section.</p>")
    else:
        rows = []
        for k, v in metrics[kind].items():
            if isinstance(v, (dict, list)):
                continue
            label = PRETTY.get(k) or (k.replace("recall@", "Recall@") if k.startswith("recall@") else k)
            rows.append(f"<tr><td>{_esc(label)}</td><td class=\"value\">{_esc(format_metric(k, v))}</td>"
                        f"<td class=\"def\">{_esc(definition_for(k, defs))}</td></tr>")
        timing = metrics.get("timing") or {}
        if timing.get("images_per_second") is not None:
            rows.append(f"<tr><td>throughput</td><td class=\"value\">{timing['images_per_second']:.1f} images/s"
                        f"</td><td class=\"def\">model forward passes over {timing.get('n_images', '?')} test images"
                        f" ({fmt_seconds(timing.get('model_seconds'))} s), excluding decoding</td></tr>")
        parts.append('<table class="metrics"><thead><tr><th>metric</th><th>value</th><th>definition</th></tr>'
                     f"</thead><tbody>{''.join(rows)}</tbody></table>")
    counts = ", ".join(f"{proto[k]:,} {k.removeprefix('n_')}" for k in ("n_train", "n_val", "n_test")
                       if isinstance(proto.get(k), int))
    info = [
        ("data", data_words(proto) if proto else MISSING),
        ("protocol", protocol_words(proto)),
        ("images", counts or MISSING),
        ("classes", str(proto.get("num_classes", MISSING))),
    ]
    mach = metrics.get("machine") or {}
    if mach:
        info.append(("machine", f"{mach.get('platform', '?')}, {mach.get('cores', mach.get('cpus', '?'))} CPU cores, "
                                f"CUDA {'yes' if mach.get('cuda') else 'no'}"))
    if metrics.get("checkpoint"):
        checksum = str(metrics.get("model_checksum") or "")[:12]
        info.append(("checkpoint", f"{metrics['checkpoint']}" + (f" (sha256 {checksum}…)" if checksum else "")))
    if metrics.get("evaluated_at"):
        info.append(("evaluated at", metrics["evaluated_at"]))
    parts += ["<h3>Data and protocol</h3>", _kv_table(info)]
    return "\n".join(parts)


def _confused_table(pairs: list[dict]) -> str:
    rows = "".join(f"<tr><td>{i + 1}</td><td>{_esc(p.get('true'))}</td><td>{_esc(p.get('predicted'))}</td>"
                   f"<td class=\"value\">{_esc(p.get('count'))}</td></tr>" for i, p in enumerate(pairs))
    return ('<table class="metrics"><thead><tr><th>#</th><th>true class</th><th>predicted as</th>'
            f"<th>test images</th></tr></thead><tbody>{rows}</tbody></table>")


def _per_class_details(per_class_csv: Path) -> str:
    rows = figures.read_per_class_csv(per_class_csv)

    def pct(v):
        return MISSING if v is None else f"{100 * v:.1f}%"

    body = "".join(
        f"<tr><td>{_esc(r['class'])}</td>"
        f"<td class=\"value\">{int(r['support']) if r['support'] is not None else MISSING}</td>"
        f"<td class=\"value\">{pct(r['accuracy'])}</td><td class=\"value\">{pct(r['precision'])}</td>"
        f"<td class=\"value\">{pct(r['f1'])}</td></tr>" for r in rows)
    return (f"<details><summary>Every class ({len(rows)})</summary><table class=\"metrics\"><thead><tr><th>class</th>"
            "<th>test images</th><th>accuracy</th><th>precision</th><th>F1</th></tr></thead>"
            f"<tbody>{body}</tbody></table></details>")


def _try_figure(title: str, build, png: Path, caption: str) -> str:
    try:
        build()
    except Exception as e:  # noqa: BLE001 - one figure failing never loses the report
        log.warning("%s: %s", title, e)
        return _skipped(title, f"drawing failed ({type(e).__name__}: {e})")
    return _figure_html(png, title, caption)


# ---------------------------------------------------------------- the run report

def write_report(run_path: Path, class_names: list[str] | None = None) -> Path:
    """Write ``<run>/report/index.html`` (self-contained) and its PNG figures; return the page's path.

    ``class_names`` (index = label) names the classes of the embeddings; by default
    they are read from per_class.csv's row order, else from the names training logged,
    else from the images' folders; failing all, labels are shown as numbers.
    """
    run = RunDir(Path(run_path))
    out_dir = run.report
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = _load_config(run)
    metrics = _read_metrics(run)
    per_class_csv = run.path / "per_class.csv"
    names = list(class_names) if class_names is not None else (
        per_class_names(per_class_csv) or logged_class_names(run.path))
    npz = run.embeddings / "test.npz"
    emb = _load_embeddings(npz)
    if names is None and emb is not None:
        names = names_from_folders(emb[1], emb[2])
    resolve = _resolver(run)
    title = cfg.name if cfg is not None else (metrics or {}).get("run", run.name)
    description = (cfg.description if cfg is not None else "") or ""

    body = [f"<header><h1>{_esc(title)}</h1>"]
    if description:
        body.append(f'<p class="desc">{_esc(description)}</p>')
    body.append(_kv_table(_config_brief(cfg, metrics)) + "</header>")

    # metrics
    if metrics is None:
        body.append("<h2>Test metrics</h2>" + _skipped("Metrics", f"{run.metrics.name} not found "
                                                                   f"(run `finegrain evaluate {run.path}`)"))
    else:
        body.append(_metrics_section(metrics))

    # learning curves
    body.append("<h2>Training</h2>")
    png = out_dir / "learning_curves.png"
    if run.history.is_file():
        body.append(_try_figure("Learning curves", lambda: figures.learning_curves(run.history, png), png,
                                "Loss, validation metric and learning rate per epoch (from history.csv)."))
    else:
        why = "history.csv not found" + (" (a kNN row is not trained)" if cfg is not None and not cfg.trains
                                         else "")
        body.append(_skipped("Learning curves", why))

    # confused pairs
    pairs = (metrics or {}).get("confused_pairs") or []
    if metrics is not None and "classification" in metrics:
        body.append("<h2>Most confused classes</h2>")
        if pairs:
            body.append(_confused_table(pairs))
            if emb is not None:
                wanted = [str(p.get(k)) for p in pairs[:5] for k in ("true", "predicted")]
                ex = examples_by_class(wanted, emb[1], emb[2], names, resolve=resolve)
                png = out_dir / "confused_pairs.png"
                body.append(_try_figure("Confused pairs", lambda: figures.confused_pairs_figure(pairs, ex, png),
                                        png, "Two test images of the true class (blue frame) beside two of the "
                                             "class it was most often mistaken for (orange frame)."))
            else:
                body.append(_skipped("Example images of confused pairs", "embeddings/test.npz (image paths) not found"))
        else:
            body.append("<p>No misclassified test images.</p>")

    # per class
    if per_class_csv.is_file():
        body.append("<h2>Per-class accuracy</h2>")
        png = out_dir / "per_class_accuracy.png"
        body.append(_try_figure("Per-class accuracy", lambda: figures.per_class_accuracy(per_class_csv, png), png,
                                "Test accuracy (= recall) of the worst and best classes, with correct / test images."))
        body.append(_per_class_details(per_class_csv))
    elif metrics is not None and "classification" in metrics:
        body.append("<h2>Per-class accuracy</h2>" + _skipped("Per-class accuracy", "per_class.csv not found"))

    # retrieval gallery
    body.append("<h2>Retrieval examples</h2>")
    if emb is not None:
        png = out_dir / "retrieval_gallery.png"
        paths = [str(resolve(p)) for p in emb[2]]
        body.append(_try_figure(
            "Retrieval gallery",
            lambda: figures.retrieval_gallery(emb[0], emb[1], paths, png, class_names=names), png,
            "Seeded random test queries and their 5 nearest test images by cosine similarity of the embeddings "
            "(the query itself excluded); green frame = same class, red = another class."))
    else:
        body.append(_skipped("Retrieval gallery", "embeddings/test.npz not found"))

    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    body.append(f"<footer>finegrain report of <code>{_esc(run.path)}</code>, generated {generated}.</footer>")
    page = html_page(f"{title} — finegrain report", "\n".join(body), REPORT_CSS)
    out = out_dir / "index.html"
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


def write_multi_report(run_paths: list[Path], out_html: Path, title: str = "Runs compared",
                       run_reports: bool = True) -> Path:
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
        img = (f'<a href="{_esc(r["report"])}"><img src="{png_data_uri(png)}" '
               f'alt="learning curves of {_esc(r["name"])}"></a>'
               if run.history.is_file() and png.is_file() else '<p class="skipped">no history.csv</p>')
        cards.append(f'<div class="card"><h3><a href="{_esc(r["report"])}">{_esc(r["name"])}</a></h3>'
                     f'<div class="desc">{_esc(r.get("description") or "")}</div>{img}</div>')
    unfinished = [p for p in run_paths if p not in finished]
    body = [f"<h1>{_esc(title)}</h1>", html_tables_fragment(rows), "<h2>Learning curves</h2>",
            f'<div class="cards">{"".join(cards)}</div>' if cards else "<p>No finished runs.</p>"]
    if unfinished:
        body.append("<h2>Not evaluated</h2><ul>" + "".join(
            f"<li><code>{_esc(p)}</code>: no metrics.json</li>" for p in unfinished) + "</ul>")
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    body.append(f"<footer>finegrain comparison of {len(rows)} run(s), generated {generated}.</footer>")
    atomic_write_text(out_html, html_page(title, "\n".join(body), REPORT_CSS))
    return out_html
