"""Report figures as PNG files: learning curves, per-class accuracy, confused pairs, a retrieval gallery.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
figure state, no display needed). Images are loaded with PIL; a missing or
unreadable image becomes a grey placeholder instead of an error.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

from finegrain.report.thumbnails import load_thumb, placeholder, show_image  # noqa: F401 - load_thumb, placeholder re-exported

DPI = 110
STYLE: dict[RcKeyType, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 13,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
SAME = "#2e9d3a"  # green frame: neighbour of the query's class
OTHER = "#d62728"  # red frame: neighbour of another class
QUERY = "#1f4e9c"


def _new_figure(w: float, h: float, **kw) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI, **kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_png: Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI, format="png", facecolor="white")
    tmp.replace(out_png)
    return out_png


def _short(text: str, n: int = 30) -> str:
    """``text`` cut to ``n`` characters in the middle, so both the make and the year of
    'Chevrolet Silverado 2500HD Regular Cab 2012' survive: 'Chevrolet Silverado…Cab 2012'."""
    text = str(text)
    if len(text) <= n:
        return text
    tail = (n - 1) // 2
    head = n - 1 - tail
    return text[:head].rstrip() + "…" + text[-tail:].lstrip()


# ---------------------------------------------------------------- learning curves


def read_history_csv(history_csv: Path) -> dict[str, np.ndarray]:
    """history.csv as columns of floats (NaN where a cell is empty or not a number)."""
    with Path(history_csv).open(newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, np.ndarray] = {}
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k is not None and k not in keys]
    for k in keys:
        vals = []
        for r in rows:
            try:
                vals.append(float(r.get(k) or "nan"))
            except ValueError:
                vals.append(float("nan"))
        cols[k] = np.array(vals, dtype=float)
    return cols


def _pretty(col: str) -> str:
    split, _, name = col.partition("/")
    if not name:
        return col
    name = {"acc": "accuracy", "loss": "loss", "map@r": "MAP@R"}.get(name, name.replace("recall@", "Recall@"))
    return f"{name} ({split})"


def _plot_series(ax, x: np.ndarray, y: np.ndarray, label: str, **kw) -> bool:
    ok = ~np.isnan(y)
    if not ok.any():
        return False
    ax.plot(x[ok], y[ok], marker="o", markersize=3.5, linewidth=1.8, label=label, **kw)
    return True


def _epoch_axis(cols: dict[str, np.ndarray], history_csv: Path) -> np.ndarray:
    """The epoch column, or 1..n when it is missing or has gaps; ValueError when there are no rows."""
    if not cols or not next(iter(cols.values())).size:
        raise ValueError(f"{history_csv} has no epochs")
    n = next(iter(cols.values())).size
    x = cols.get("epoch", np.arange(1, n + 1, dtype=float))
    if np.isnan(x).any():
        x = np.arange(1, n + 1, dtype=float)
    return x


def _curve_panels(cols: dict[str, np.ndarray], history_csv: Path) -> list[tuple[str, list[str]]]:
    """(kind, columns) of each panel with data: loss, the validation metric, learning rates."""

    def has(c: str) -> bool:
        return c in cols and not np.isnan(cols[c]).all()

    loss_cols = [c for c in cols if c.split("/")[-1] == "loss" and has(c)]
    loss_cols.sort(key=lambda c: (not c.startswith("train"), c))
    metric_cols = [
        c for c in cols if c.split("/")[-1] in ("acc", "top1", "recall@1", "map@r", "precision@1") and has(c)
    ]
    metric_cols.sort(
        key=lambda c: (c.split("/")[-1] != "acc", c.split("/")[-1] != "recall@1", not c.startswith("train"), c)
    )
    lr_cols = [c for c in cols if c.startswith("lr") and has(c)]
    panels = [p for p in (("loss", loss_cols), ("metric", metric_cols), ("lr", lr_cols)) if p[1]]
    if not panels:
        raise ValueError(f"{history_csv}: no loss, metric or learning-rate columns to plot")
    return panels


def learning_curves_caption(history_csv: Path) -> str:
    """What the learning-curve figure of ``history_csv`` shows, in words: a run without a validation
    split (``data.val_fraction: 0``) has only training curves, and the caption says so."""
    try:
        cols = read_history_csv(history_csv)
        panels = _curve_panels(cols, history_csv)
    except (OSError, ValueError):
        return "Loss, metric and learning rate per epoch (from history.csv)."
    drawn, kinds = [c for _, names in panels for c in names], {kind for kind, _ in panels}
    if any(c.startswith("val") for c in drawn):
        return "Loss, validation metric and learning rate per epoch (from history.csv)."
    shown = [
        what
        for kind, what in (("loss", "training loss"), ("metric", "training accuracy"), ("lr", "learning rate"))
        if kind in kinds
    ]
    listed = ", ".join(shown[:-1]) + " and " + shown[-1] if len(shown) > 1 else shown[0]
    return (
        f"{listed[0].upper()}{listed[1:]} per epoch (from history.csv). The run held no images out for "
        "validation (data.val_fraction: 0), so there are no validation curves; the checkpoint kept is "
        "the epoch with the lowest training loss."
    )


def _style_metric_axis(ax, cols: dict[str, np.ndarray], names: list[str]) -> None:
    """Title, label and a y range in % around the metric's values."""
    names_only = {c.split("/")[-1] for c in names}
    is_acc = names_only <= {"acc", "top1"}
    has_val = any(c.startswith("val") for c in names)
    ax.set_title("Accuracy" if is_acc else "Validation metric" if has_val else "Training metric")
    ax.set_ylabel("accuracy (%)" if is_acc else "metric value (%)")
    lo = min(float(np.nanmin(cols[c])) for c in names) * 100
    hi = max(float(np.nanmax(cols[c])) for c in names) * 100
    ax.set_ylim(max(0.0, lo - 5) if lo > 20 else 0.0, min(100.0, hi + 5) if hi < 95 else 101.0)


def _style_lr_axis(ax, cols: dict[str, np.ndarray], names: list[str]) -> None:
    """Title, label and a log scale when the learning rates span more than 20x."""
    ax.set_title("Learning rate")
    ax.set_ylabel("learning rate")
    vals = np.concatenate([cols[c][~np.isnan(cols[c])] for c in names])
    if (vals > 0).all() and vals.max() / vals.min() > 20:
        ax.set_yscale("log")
        ax.set_ylabel("learning rate (log scale)")
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if vals.size and vals.max() == vals.min():
            ax.set_ylim(0, 1.5 * vals.max() if vals.max() > 0 else 1)


def _style_epoch_axis(ax, x: np.ndarray) -> None:
    """Integer epoch ticks (every epoch when there are at most 20)."""
    if x.size <= 20:
        ax.set_xticks(x)
    else:
        # optional: matplotlib (the train extra), imported only when this runs
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if x.size == 1:
        ax.set_xlim(x[0] - 1, x[0] + 1)


def _lr_series(names: list[str], cols: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """(column, label) per distinct learning-rate curve: parameter groups that share one rate are
    drawn once, labelled with all their names ("backbone and head"), not as lines hiding each other."""
    merged: list[tuple[str, list[str]]] = []
    for c in names:
        group = c.partition("/")[2] or c
        group = f"param group {group}" if group.isdigit() else group
        same = next((m for m in merged if np.allclose(cols[m[0]], cols[c], rtol=1e-9, atol=0, equal_nan=True)), None)
        if same:
            same[1].append(group)
        else:
            merged.append((c, [group]))
    return [
        (c, groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + " and " + groups[-1]) for c, groups in merged
    ]


def _draw_curve_panel(ax, kind: str, names: list[str], cols: dict[str, np.ndarray], x: np.ndarray) -> None:
    """One panel of the learning curves: its series (train dashed), axes and legend."""
    series = _lr_series(names, cols) if kind == "lr" else [(c, _pretty(c)) for c in names]
    for c, label in series:
        y = cols[c] * (100.0 if kind == "metric" else 1.0)
        _plot_series(ax, x, y, label, linestyle="--" if c.startswith("train") and kind != "lr" else "-")
    ax.set_xlabel("epoch")
    if kind == "loss":
        ax.set_title("Loss")
        ax.set_ylabel("loss (mean over the epoch)")
        ax.set_ylim(bottom=0)
    elif kind == "metric":
        _style_metric_axis(ax, cols, names)
    else:
        _style_lr_axis(ax, cols, names)
    _style_epoch_axis(ax, x)
    ax.legend(loc="best", frameon=False)


def learning_curves(history_csv: Path, out_png: Path, title: str | None = None) -> Path:
    """Loss (train and val), the validation metric (accuracy or Recall@1/MAP@R, %) and the
    learning rates, each against the epoch. Panels without data are left out.

    Raises FileNotFoundError when ``history_csv`` does not exist and ValueError when it has
    no rows or nothing to plot.
    """
    cols = read_history_csv(history_csv)
    x = _epoch_axis(cols, history_csv)
    panels = _curve_panels(cols, history_csv)
    with matplotlib.rc_context(STYLE):
        fig = _new_figure(4.3 * len(panels) + 0.4, 3.8, layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (kind, names) in zip(axes, panels, strict=True):
            _draw_curve_panel(ax, kind, names, cols, x)
        if title:
            fig.suptitle(title)
        return _save(fig, out_png)


# ---------------------------------------------------------------- per-class accuracy


def _number(text: str | None) -> float | None:
    """A CSV cell as a float; None when empty or not a number."""
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def read_per_class_csv(per_class_csv: Path) -> list[dict]:
    """per_class.csv rows with ``accuracy`` as a float in [0, 1] (from correct/support when absent)."""
    out = []
    with Path(per_class_csv).open(newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            num = {k: _number(r.get(k)) for k in ("accuracy", "recall", "support", "correct", "precision", "f1")}
            acc, support = num["accuracy"], num["support"]
            if acc is None:
                acc = num["recall"]
            if acc is None and support:
                acc = (num["correct"] or 0.0) / support
            out.append(
                {
                    "index": i,
                    "class": r.get("class") or f"class {i}",
                    "accuracy": acc,
                    "support": support,
                    "correct": num["correct"],
                    "precision": num["precision"],
                    "recall": num["recall"],
                    "f1": num["f1"],
                }
            )
    return out


def per_class_accuracy(per_class_csv: Path, out_png: Path, n: int = 15) -> Path:
    """The ``n`` worst and ``n`` best classes by test accuracy as horizontal bars (one
    panel with every class when there are at most ``2 n``)."""
    rows = [r for r in read_per_class_csv(per_class_csv) if r["accuracy"] is not None]
    if not rows:
        raise ValueError(f"{per_class_csv}: no classes with an accuracy")
    rows.sort(key=lambda r: (r["accuracy"], r["class"]))
    if len(rows) <= 2 * n:
        groups = [(f"All {len(rows)} classes, by test accuracy", rows)]
    else:
        groups = [(f"Worst {n} of {len(rows)} classes", rows[:n]), (f"Best {n} of {len(rows)} classes", rows[-n:])]
    longest = max(len(_short(r["class"], 38)) for r in rows)
    height = 1.2 + 0.28 * max(len(g) for _, g in groups)
    width_each = 3.4 + 0.065 * longest
    # optional: matplotlib (the train extra), imported only when this runs
    from matplotlib import colormaps

    cmap = colormaps["RdYlGn"]
    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        fig = _new_figure(width_each * len(groups) + 0.6, height, layout="constrained")
        axes = fig.subplots(1, len(groups), squeeze=False)[0]
        for ax, (title, group) in zip(axes, groups, strict=True):
            y = np.arange(len(group))
            acc = np.array([r["accuracy"] for r in group]) * 100
            ax.barh(
                y, acc, color=[cmap(0.1 + 0.8 * a / 100) for a in acc], edgecolor="#444", linewidth=0.4, height=0.75
            )
            ax.set_yticks(y, [_short(r["class"], 38) for r in group])
            ax.invert_yaxis() if "Best" not in title else None
            ax.set_xlim(0, 118)
            ax.set_xticks([0, 20, 40, 60, 80, 100])
            ax.grid(True, axis="x", alpha=0.3)
            ax.set_xlabel("test accuracy (%)")
            ax.set_title(title)
            for yi, r, a in zip(y, group, acc, strict=True):
                sup = f" ({int(r['correct'])}/{int(r['support'])})" if r["support"] and r["correct"] is not None else ""
                ax.text(a + 1.5, yi, f"{a:.0f}%{sup}", va="center", fontsize=8, color="#222")
        return _save(fig, out_png)


# ---------------------------------------------------------------- confused pairs


def confused_pairs_figure(
    pairs: Sequence[dict],
    examples: dict[str, list[Path]],
    out_png: Path,
    n_pairs: int = 5,
    per_class: int = 2,
    thumb: int = 128,
) -> Path:
    """For each of the top ``n_pairs`` (true, predicted) pairs, one row: ``per_class`` images
    of the true class (blue frame) and ``per_class`` of the class it was mistaken for (orange).

    ``pairs``: ``[{"true": name, "predicted": name, "count": int}]`` as in metrics.json;
    ``examples``: class name -> image paths (missing ones become grey placeholders).
    """
    pairs = list(pairs)[:n_pairs]
    if not pairs:
        raise ValueError("no confused pairs to show")
    true_c, pred_c = "#1f4e9c", "#e07b00"
    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        fig = _new_figure(2 * per_class * 1.75 + 0.8, 2.45 * len(pairs) + 0.7, layout="constrained")
        fig.suptitle("Most confused class pairs (test set)", fontweight="bold")
        subs = fig.subfigures(len(pairs), 1, squeeze=False)[:, 0]
        for i, (sub, p) in enumerate(zip(subs, pairs, strict=True)):
            t, pr, cnt = str(p.get("true")), str(p.get("predicted")), p.get("count")
            sub.suptitle(
                f"#{i + 1}: true “{_short(t, 40)}”\npredicted as “{_short(pr, 40)}”"
                + (f" ({int(cnt)} test image{'s' if int(cnt) != 1 else ''})" if cnt is not None else ""),
                fontsize=9.5,
            )
            axes = sub.subplots(1, 2 * per_class)
            for j in range(2 * per_class):
                cls, color, role = (t, true_c, "true class") if j < per_class else (pr, pred_c, "predicted class")
                paths = list(examples.get(cls, []))
                k = j % per_class
                show_image(axes[j], paths[k] if k < len(paths) else None, thumb, frame=color, width=3)
                axes[j].set_xlabel(role, fontsize=8, color=color)
        return _save(fig, out_png)


# ---------------------------------------------------------------- retrieval gallery


def nearest_neighbours(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` neighbours of ``emb[queries]`` among all of ``emb`` by cosine similarity, the
    query itself excluded. Returns (indices [Q, k], similarities [Q, k])."""
    e = np.asarray(emb, dtype=np.float32)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sim = e[queries] @ e.T
    sim[np.arange(len(queries)), queries] = -np.inf
    k = min(k, e.shape[0] - 1)
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sim, idx, axis=1)


def retrieval_gallery(
    emb: np.ndarray,
    labels: np.ndarray,
    paths: Sequence[str | Path],
    out_png: Path,
    n_queries: int = 6,
    k: int = 5,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    thumb: int = 128,
) -> Path:
    """``n_queries`` seeded random queries, each followed by its ``k`` nearest neighbours by
    cosine similarity (query excluded): green frame = same class as the query, red = another.

    ``emb`` [N, D] float, ``labels`` [N] int, ``paths`` [N] image files.
    """
    emb = np.asarray(emb)
    labels = np.asarray(labels)
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"need at least 2 embeddings of shape [N, D], got {emb.shape}")
    if len(labels) != emb.shape[0] or len(paths) != emb.shape[0]:
        raise ValueError("embeddings, labels and paths must have the same length")
    rng = np.random.default_rng(seed)
    order = rng.permutation(emb.shape[0])
    # one query per class first (so the rows show different classes), then the rest in random order
    _, first = np.unique(labels[order], return_index=True)
    picked = list(order[np.sort(first)][:n_queries])
    taken = set(picked)
    picked += [i for i in order if i not in taken][: n_queries - len(picked)]
    q = np.array(picked, dtype=int)
    idx, sims = nearest_neighbours(emb, q, k)
    k = idx.shape[1]

    def name(label, n: int = 25) -> str:
        li = int(label)
        if class_names is not None and 0 <= li < len(class_names):
            return _short(class_names[li], n)
        return f"class {li}"

    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        # a fixed layout (in inches): constrained layout is slow with this many axes
        w, h = 1.85 * (k + 1) + 0.5, 2.05 * len(q) + 0.9
        fig = _new_figure(w, h)
        gap, wgap, top, bottom, side = 0.42, 0.25, 0.42 + 0.42, 0.45, 0.25
        ax_h = (h - top - bottom - gap * (len(q) - 1)) / len(q)
        ax_w = (w - 2 * side - wgap * k) / (k + 1)
        axes = fig.subplots(
            len(q),
            k + 1,
            squeeze=False,
            gridspec_kw={
                "left": side / w,
                "right": 1 - side / w,
                "top": 1 - top / h,
                "bottom": bottom / h,
                "hspace": gap / ax_h,
                "wspace": wgap / ax_w,
            },
        )
        fig.suptitle(
            f"Retrieval: {len(q)} random test queries and their {k} nearest neighbours (cosine)",
            fontweight="bold",
            y=1 - 0.12 / h,
            va="top",
        )
        for r, qi in enumerate(q):
            show_image(axes[r, 0], paths[qi], thumb, frame=QUERY, width=4)
            axes[r, 0].set_title(f"query\n{name(labels[qi], 22)}", fontsize=8.5, color=QUERY, fontweight="bold")
            for c in range(k):
                ni = int(idx[r, c])
                same = labels[ni] == labels[qi]
                show_image(axes[r, c + 1], paths[ni], thumb, frame=SAME if same else OTHER, width=4)
                axes[r, c + 1].set_title(
                    f"#{c + 1} sim {sims[r, c]:.2f}\n{name(labels[ni])}", fontsize=8.5, color="#222" if same else OTHER
                )
        fig.legend(
            handles=[
                Patch(facecolor="white", edgecolor=QUERY, linewidth=3, label="query"),
                Patch(facecolor="white", edgecolor=SAME, linewidth=3, label="same class as query"),
                Patch(facecolor="white", edgecolor=OTHER, linewidth=3, label="different class"),
            ],
            loc="lower center",
            bbox_to_anchor=(0.5, 0.02 / h),
            ncol=3,
            frameon=False,
        )
        return _save(fig, out_png)
