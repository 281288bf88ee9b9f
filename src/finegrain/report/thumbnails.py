"""Image thumbnails for the report figures: a file letter-boxed to a square, or a grey
placeholder (labelled with the reason) when it is missing or unreadable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def placeholder(size: int = 128) -> np.ndarray:
    """A grey square with a light cross, shown instead of an image that cannot be read."""
    img = np.full((size, size, 3), 200, dtype=np.uint8)
    i = np.arange(size)
    for d in (-1, 0, 1):
        j = np.clip(i + d, 0, size - 1)
        img[i, j] = 170
        img[i, size - 1 - j] = 170
    return img


def thumb(path: str | Path | None, size: int) -> tuple[np.ndarray, str | None]:
    """(RGB uint8 [size, size, 3], None) for a readable image, else (placeholder, why)."""
    if path is None:
        return placeholder(size), "no example"

    try:
        with Image.open(path) as source:
            im = ImageOps.contain(
                ImageOps.exif_transpose(source).convert("RGB"), (size, size), method=Image.Resampling.LANCZOS
            )
            canvas = Image.new("RGB", (size, size), (255, 255, 255))
            canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
            return np.asarray(canvas), None
    except FileNotFoundError:
        return placeholder(size), "image missing"
    except Exception:  # noqa: BLE001 - truncated, not an image, unreadable: fail soft
        return placeholder(size), "unreadable"


def load_thumb(path: str | Path | None, size: int = 128) -> np.ndarray:
    """An RGB uint8 array [size, size, 3]: the image letter-boxed on white (scaled to fit),
    or a grey placeholder when the file is missing or unreadable."""
    return thumb(path, size)[0]


def show_image(ax, path: str | Path | None, size: int, frame: str | None = None, width: float = 4.0) -> None:
    """Draw an image file (or its placeholder, labelled with the reason) on ``ax`` in a coloured frame."""
    img, note = thumb(path, size)
    ax.imshow(img, interpolation="antialiased")
    if note:
        ax.text(
            0.5,
            0.5,
            note,
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=8,
            color="#333",
            bbox={"facecolor": "#c8c8c8", "edgecolor": "none", "pad": 2},
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame is not None:
            spine.set_edgecolor(frame)
            spine.set_linewidth(width)
