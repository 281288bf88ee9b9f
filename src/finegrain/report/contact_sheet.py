"""A contact sheet: the query and its neighbours in one PNG, each titled with rank, class and score;
with an explanation, each image carries its map (viridis, half transparent) and the sheet a legend."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from finegrain.data.images import open_rgb
from finegrain.errors import FinegrainError
from finegrain.inference.explain import overlay
from finegrain.retrieval.explain_search import Explanation
from finegrain.retrieval.searcher import Hit


def hit_title(h: Hit) -> str:
    """A neighbour's title: rank, class (a long one cut in the middle, keeping make and year), score,
    and whether it is the query's own file."""
    # optional: matplotlib (the train extra), which figures imports; only a drawn sheet needs it
    from finegrain.report.figures import _short

    return f"#{h.rank} {_short(h.label, 28)}\nscore {h.score:.3f}" + (" (the query itself)" if h.same_image else "")


def contact_sheet(
    query: Image.Image,
    hits: list[Hit],
    out: Path,
    query_label: str | None = None,
    explanation: Explanation | None = None,
) -> Path:
    """A PNG of the query and its neighbours, each titled with rank, class and score; with
    ``explanation`` (of these hits), each image with its map laid over it."""
    # optional: the train extra (matplotlib), loaded only where a sheet is drawn
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    # optional: matplotlib (the train extra), imported only when this runs
    import matplotlib.pyplot as plt

    n = len(hits) + 1
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    maps = {m.id: m.map for m in explanation.hits} if explanation else {}
    if explanation is not None:
        query_label = f"evidence for {explanation.explains}"
    axes.flat[0].imshow(overlay(np.asarray(query), explanation.query_map) if explanation else query)
    axes.flat[0].set_title("query" + (f"\n{query_label}" if query_label else ""), fontsize=9, fontweight="bold")
    for ax, h in zip(list(axes.flat)[1:], hits, strict=False):
        try:
            img, _ = open_rgb(h.path)
        except FinegrainError:
            continue
        ax.imshow(overlay(np.asarray(img), maps[h.id]) if h.id in maps else img)
        ax.set_title(hit_title(h), fontsize=8)
    if explanation is not None:
        fig.text(
            0.5,
            0.005,
            "maps (viridis): dark purple = least, yellow = most evidence; each scaled to its own "
            "range. Neighbours: what made them alike the query",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    fig.tight_layout(rect=(0, 0.03 if explanation is not None else 0, 1, 1))
    out = out if out.suffix else out.with_suffix(".png")  # what savefig writes to a name without one
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
