"""The run report's "what the model looked at": right and wrong test predictions with their maps.

A seeded sample of the test images (from ``embeddings/test.npz``) is run through the run's model
(:func:`~finegrain.inference.open_encoder`: its ONNX export when current, else PyTorch). A run that
predicts with its classifier shows, for up to ``n`` right and ``n`` wrong predictions, the image with
the class activation map of the predicted class. Otherwise each query's nearest other test image
(cosine of the saved embeddings) is its prediction, and the pair is shown with both similarity maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from finegrain.data.images import open_rgb
from finegrain.inference import open_encoder
from finegrain.inference.explain import class_activation_map, explain_rgbs, overlay, pair_maps, to_unit
from finegrain.metrics.retrieval import l2_normalize
from finegrain.report.figures import _new_figure, _save, _short
from finegrain.report.page_parts import Figure, skipped, try_figure
from finegrain.runs import RunDir

CAPTION_CLASS = (
    "Test images the model classified right (top row) and wrong (bottom row), each with the class "
    "activation map of the class it predicted (viridis: yellow = most evidence, each map scaled to "
    "its own range)."
)
CAPTION_PAIRS = (
    "Test queries whose nearest test image is of the same class (top row) or of another (bottom "
    "row): each pair with the query's map against the neighbour and the neighbour's against the "
    "query (viridis: yellow = what made them most alike)."
)


def _name(names: Sequence[str] | None, label: int) -> str:
    return names[label] if names and 0 <= label < len(names) else str(label)


def _tile(ax, rgb: np.ndarray, m01: np.ndarray, title: str, right: bool) -> None:

    ax.imshow(overlay(rgb, m01))
    ax.set_title(title, fontsize=7, color="#1a7f37" if right else "#b3261e")
    ax.axis("off")


def _row_height(images: Sequence[Image.Image]) -> float:
    """Inches of a row of 2.1-inch-wide tiles of ``images`` (their median shape) with two-line titles:
    wide photos (cars are about 2:1) in rows as tall as wide left half the figure blank."""
    aspect = float(np.median([im.height / im.width for im in images])) if images else 1.0
    return 2.1 * min(aspect, 1.5) + 0.5


def explained_predictions(
    run: RunDir,
    emb: tuple[np.ndarray, np.ndarray, list[str]],
    names: list[str] | None,
    resolve: Callable[[str], Path],
    out_png: Path,
    n: int = 4,
    pool: int = 32,
    seed: int = 0,
) -> Path:
    """Draw the figure (see the module docstring) into ``out_png``."""
    vectors, labels, paths = emb
    encoder = open_encoder(run)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(paths), size=min(pool, len(paths)), replace=False)

    def rgb(i: int):
        return open_rgb(resolve(paths[i]))[0]

    size = encoder.sizes[0]
    if encoder.has_classifier and encoder.cfg.predicts_with_classifier:
        maps = explain_rgbs(encoder, [rgb(i) for i in sample])
        rows: list[list] = [[], []]
        for i, m in zip(sample, maps, strict=True):
            right = m.predicted_class == int(labels[i])
            if len(rows[0 if right else 1]) < n:
                rows[0 if right else 1].append((i, m))
        shown = [rgb(i) for row in rows for i, _ in row]
        fig = _new_figure(2.1 * n, 2 * _row_height(shown), layout="constrained")
        axes = fig.subplots(2, n, squeeze=False)
        for r, row in enumerate(rows):
            for c in range(n):
                axes[r][c].axis("off")
            for c, (i, m) in enumerate(row):
                true, pred = _name(names, int(labels[i])), _name(names, int(m.predicted_class or 0))
                title = f"true {_short(true, 22)}\npred {_short(pred, 22)}"
                _tile(axes[r][c], np.asarray(rgb(i)), to_unit(class_activation_map(m, size=size)), title, r == 0)
        return _save(fig, out_png)
    unit = l2_normalize(vectors)
    pairs: list[list[tuple[int, int]]] = [[], []]
    for q in sample:
        sims = unit @ unit[q]
        sims[q] = -np.inf
        hit = int(np.argmax(sims))
        right = int(labels[hit]) == int(labels[q])
        if len(pairs[0 if right else 1]) < n:
            pairs[0 if right else 1].append((int(q), hit))
    fig = _new_figure(2.1 * 2 * n, 2 * _row_height([rgb(q) for row in pairs for q, _ in row]), layout="constrained")
    axes = fig.subplots(2, 2 * n, squeeze=False)
    for r, row in enumerate(pairs):
        for c in range(2 * n):
            axes[r][c].axis("off")
        for c, (q, h) in enumerate(row):
            qm, hm = explain_rgbs(encoder, [rgb(q), rgb(h)])
            q_map, h_map = pair_maps(qm, hm, size)
            _tile(
                axes[r][2 * c],
                np.asarray(rgb(q)),
                to_unit(q_map),
                f"query\n{_short(_name(names, int(labels[q])), 22)}",
                r == 0,
            )
            _tile(
                axes[r][2 * c + 1],
                np.asarray(rgb(h)),
                to_unit(h_map),
                f"nearest\n{_short(_name(names, int(labels[h])), 22)}",
                r == 0,
            )
    return _save(fig, out_png)


def explain_section(inp) -> Figure:
    """The report section's figure, or why it is not drawn."""
    emb = inp.emb
    if emb is None:
        return skipped("Maps of right and wrong predictions", "embeddings/test.npz not found")
    png = inp.out_dir / "explained_predictions.png"
    caption = CAPTION_CLASS if inp.cfg is not None and inp.cfg.predicts_with_classifier else CAPTION_PAIRS
    return try_figure(
        "Maps of right and wrong predictions",
        lambda: explained_predictions(inp.run, emb, inp.names, inp.resolve, png),
        png,
        caption,
    )
