"""A built-in synthetic fine-grained dataset: little "cars" that differ in details.

Every class is a side-view car-like object drawn with PIL: a rounded body with a
cabin, windows, wheels and lights. A class is a combination of three attributes,

* **body colour** (hue; the coarsest attribute),
* **body type** (``Sedan`` / ``Hatch`` / ``Coupe``: body aspect and cabin shape),
* **pattern** (one / two / three light stripes along the body, or a row of spots),

so several classes share a colour and differ only in the shape or the stripe
count — fine details, as in real fine-grained recognition. (Sets of up to 4
classes differ by colour alone, so that smoke tests learn them in a few epochs;
5-24 classes use 2 body types x 2 patterns, larger sets 3 x 3 or 3 x 4.) Each image puts one
object at a random position and scale (slightly rotated, sometimes mirrored, with
a little colour and shape jitter) on a cluttered random background.

:func:`render` draws one image and returns it with the object's bounding box as
``(x1, y1, x2, y2)``: inclusive, 0-based pixel coordinates, the convention of
:class:`~finegrain.data.records.ImageRecord` and of the writers (Stanford Cars'
writer stores them 1-based, as in the devkit). :func:`make_synthetic` writes a
whole dataset in a real on-disk format with the existing writers; the same
arguments always give byte-identical files.
"""

from __future__ import annotations

import colorsys
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from finegrain.data.folder import write_image_folder
from finegrain.data.tiny_imagenet import write_tiny_imagenet
from finegrain.errors import DataError

FORMATS = ("stanford_cars", "tiny_imagenet", "image_folder")
MARKER = ".finegrain-synthetic"
MAT_DESCRIPTION = b"MATLAB 5.0 MAT-file, Platform: posix, written by finegrain synthetic data"

# (name, body length / body height, cabin: rear x, rear top x, front top x, front x as fractions of length)
BODIES = (
    ("Sedan", 3.2, (0.22, 0.32, 0.60, 0.74)),
    ("Hatch", 2.3, (0.04, 0.08, 0.56, 0.72)),
    ("Coupe", 2.8, (0.30, 0.42, 0.56, 0.70)),
)
# (kind, count)
PATTERNS = (("stripe", 1), ("stripe", 2), ("stripe", 3), ("spot", 3))
# Named hues (degrees) for readable class names.
COLOUR_NAMES = (
    (0, "Crimson"),
    (20, "Vermilion"),
    (35, "Orange"),
    (50, "Amber"),
    (62, "Yellow"),
    (80, "Chartreuse"),
    (105, "Lime"),
    (130, "Green"),
    (155, "Jade"),
    (175, "Teal"),
    (190, "Cyan"),
    (205, "Azure"),
    (225, "Cobalt"),
    (245, "Blue"),
    (265, "Indigo"),
    (280, "Violet"),
    (295, "Purple"),
    (310, "Magenta"),
    (330, "Fuchsia"),
    (345, "Rose"),
    (360, "Crimson"),
)
_SPLIT_IDS = {"train": 1, "test": 2}


# --------------------------------------------------------------------------- class attributes


def _factors(num_classes: int) -> tuple[int, int, int]:
    """``(bodies, patterns, hues)`` used for ``num_classes`` classes."""
    if num_classes < 1:
        raise DataError(f"synthetic dataset needs at least 1 class, got {num_classes}")
    if num_classes <= 4:
        bodies, patterns = 1, 1  # small sets: colours only, easy to learn in a few epochs
    elif num_classes <= 24:
        bodies, patterns = 2, 2
    elif num_classes <= 72:
        bodies, patterns = 3, 3
    else:
        bodies, patterns = 3, 4
    return bodies, patterns, math.ceil(num_classes / (bodies * patterns))


def _attributes(label: int, num_classes: int) -> tuple[float, int, int, float]:
    """``(hue in degrees, body index, pattern index, hue spacing)`` of class ``label``."""
    if not 0 <= label < num_classes:
        raise DataError(f"label {label} is out of range for {num_classes} classes")
    bodies, patterns, hues = _factors(num_classes)
    pattern = label % patterns
    body = (label // patterns) % bodies
    hue_index = label // (patterns * bodies)
    spacing = 360.0 / hues
    return (15.0 + hue_index * spacing) % 360.0, body, pattern, spacing


def _colour_name(hue: float) -> str:
    return min(COLOUR_NAMES, key=lambda c: abs(c[0] - hue))[1]


def class_names_for(num_classes: int) -> list[str]:
    """Readable, unique class names such as ``"Azure Coupe 01"`` (colour, body type, number)."""
    width = max(2, len(str(num_classes)))
    names = []
    for label in range(num_classes):
        hue, body, _, _ = _attributes(label, num_classes)
        names.append(f"{_colour_name(hue)} {BODIES[body][0]} {label + 1:0{width}d}")
    return names


# --------------------------------------------------------------------------- drawing


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h % 360.0) / 360.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5)


def _background(h: int, w: int, rng: np.random.Generator) -> Image.Image:
    """A muted gradient with noise and a clutter of random shapes and lines."""
    c0 = rng.uniform(40, 200, 3).astype(np.float32)
    c1 = rng.uniform(40, 200, 3).astype(np.float32)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    arr = (c0 * (1 - t) + c1 * t) + rng.normal(0.0, 6.0, (h, w, 1)).astype(np.float32)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    n = int(rng.integers(6, 14))
    for _ in range(n):
        colour = _rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.9))
        x0, x1 = sorted(rng.uniform(-0.1, 1.1, 2) * w)
        y0, y1 = sorted(rng.uniform(-0.1, 1.1, 2) * h)
        x1 = min(x1, x0 + rng.uniform(0.1, 0.5) * w)
        y1 = min(y1, y0 + rng.uniform(0.1, 0.5) * h)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=max(1, int(rng.integers(1, 4))))
    return im


def _draw_car(
    hue: float, body: int, pattern: int, length: int, rng: np.random.Generator, hue_jitter: float
) -> Image.Image:
    """The object on a transparent RGBA layer, ``length`` pixels long (before rotation)."""
    _, aspect, cabin = BODIES[body]
    aspect *= rng.uniform(0.95, 1.05)
    L = float(length)
    bh = L / aspect  # body height
    ch = bh * rng.uniform(0.55, 0.65)  # cabin height
    r = bh * 0.32  # wheel radius
    pad = 0.02 * L
    H = ch + bh + r * 0.7 + 2 * pad
    layer = Image.new("RGBA", (int(math.ceil(L + 2 * pad)), int(math.ceil(H))), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    h = hue + rng.uniform(-hue_jitter, hue_jitter)
    s, v = rng.uniform(0.65, 0.9), rng.uniform(0.7, 0.95)
    paint = _rgb(h, s, v) + (255,)
    shade = _rgb(h, s, v * 0.8) + (255,)
    x0, y_body = pad, pad + ch
    # cabin (a trapezoid) with windows and a pillar
    rx, rtx, ftx, fx = (x0 + f * L for f in cabin)
    d.polygon([(rx, y_body + 1), (rtx, pad), (ftx, pad), (fx, y_body + 1)], fill=shade)
    inset = 0.18 * ch
    glass = _rgb(205, 0.15, rng.uniform(0.75, 0.92)) + (255,)
    d.polygon(
        [
            (rx + inset * 1.3, y_body),
            (rtx + inset * 0.6, pad + inset),
            (ftx - inset * 0.6, pad + inset),
            (fx - inset * 1.3, y_body),
        ],
        fill=glass,
    )
    mid = (rtx + ftx) / 2
    d.line([(mid, pad), (mid + (rx + fx - rtx - ftx) / 4, y_body)], fill=shade, width=max(1, int(0.06 * L)))
    # body
    d.rounded_rectangle((x0, y_body, x0 + L, y_body + bh), radius=0.3 * bh, fill=paint)
    # pattern on the body side, between the top of the body and the wheel arches
    kind, count = PATTERNS[pattern]
    light = _rgb(h, 0.08, 0.97) + (255,)
    top, bottom = y_body + 0.12 * bh, y_body + bh - r * 1.05
    if kind == "stripe":
        t = (bottom - top) / (2 * count + 1) * 1.1
        gap = ((bottom - top) - count * t) / (count + 1)
        for k in range(count):
            y = top + gap * (k + 1) + t * k
            d.rectangle((x0 + 0.06 * L, y, x0 + 0.94 * L, y + t), fill=light)
    else:
        rad = min((bottom - top) * 0.4, L / (3 * count))
        cy = (top + bottom) / 2
        for k in range(count):
            cx = x0 + L * (0.3 + 0.4 * k / max(count - 1, 1))
            d.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=light)
    # lights: head (front, right) and tail (rear, left)
    lh = 0.16 * bh
    d.rectangle(
        (x0 + L - 0.05 * L, y_body + 0.15 * bh, x0 + L - 0.005 * L, y_body + 0.15 * bh + lh), fill=(250, 235, 140, 255)
    )
    d.rectangle((x0 + 0.005 * L, y_body + 0.15 * bh, x0 + 0.04 * L, y_body + 0.15 * bh + lh), fill=(200, 30, 30, 255))
    # wheels
    for fx_ in (0.2, 0.8):
        cx, cy = x0 + fx_ * L, y_body + bh - r * 0.05
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(28, 28, 30, 255))
        hub = r * 0.45
        d.ellipse((cx - hub, cy - hub, cx + hub, cy + hub), fill=(170, 170, 175, 255))
    return layer


def render(
    label: int, num_classes: int, size: tuple[int, int], rng: np.random.Generator
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One RGB image of class ``label`` at ``size`` = ``(H, W)`` and the object's box.

    The box is ``(x1, y1, x2, y2)``, inclusive and 0-based: the tight box of the
    object's visible pixels, always inside the image.
    """
    H, W = int(size[0]), int(size[1])
    if H < 8 or W < 8:
        raise DataError(f"synthetic images must be at least 8x8 pixels, got {H}x{W}")
    hue, body, pattern, spacing = _attributes(label, num_classes)
    im = _background(H, W, rng)
    # draw at a higher resolution and scale down: smooth edges, thin stripes stay visible
    target = rng.uniform(0.5, 0.85) * W
    ss = 4 if target < 80 else 2
    layer = _draw_car(hue, body, pattern, max(8, int(target * ss)), rng, hue_jitter=min(6.0, spacing * 0.2))
    if rng.random() < 0.5:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if ss == 4:  # rotate at twice the final size: cheaper, still smooth
        layer, ss = layer.reduce(2), 2
    layer = layer.rotate(float(rng.uniform(-8.0, 8.0)), resample=Image.Resampling.BILINEAR, expand=True)
    # fit inside the image: at most 95% of either side
    scale = min(1.0, 0.95 * W / (layer.width / ss), 0.95 * H / (layer.height / ss))
    pw = max(4, min(W, int(round(layer.width / ss * scale))))
    ph = max(4, min(H, int(round(layer.height / ss * scale))))
    layer = layer.resize((pw, ph), Image.Resampling.BOX if ss > 1 else Image.Resampling.BILINEAR)
    x = int(rng.integers(0, W - pw + 1))
    y = int(rng.integers(0, H - ph + 1))
    solid = np.asarray(layer.getchannel("A")) >= 96  # the object's visible pixels
    cols, rows = np.flatnonzero(solid.any(axis=0)), np.flatnonzero(solid.any(axis=1))
    if cols.size == 0:
        cols, rows = np.array([0, pw - 1]), np.array([0, ph - 1])
    im.paste(layer, (x, y), layer)
    bbox = (x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]), y + int(rows[-1]))
    return im, bbox


# --------------------------------------------------------------------------- writing a dataset


def _prepare_root(root: Path, args: dict) -> None:
    """Create ``root``; replace an earlier synthetic dataset, refuse other non-empty folders."""
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise DataError(f"{root} is not empty; write the synthetic dataset into a new or empty folder")
        for p in root.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps(args, sort_keys=True) + "\n")


def _fix_mat_headers(root: Path) -> None:
    """scipy stamps ``.mat`` headers with the time; a fixed text keeps files byte-identical."""
    desc = MAT_DESCRIPTION.ljust(116, b" ")[:116]
    for path in sorted(root.rglob("*.mat")):
        with open(path, "r+b") as f:
            if f.read(10) == b"MATLAB 5.0":
                f.seek(0)
                f.write(desc)


def _check_args(format: str, num_classes: int, train_per_class: int, test_per_class: int) -> None:
    """Refuse an unknown format, fewer than 2 classes, or no images at all."""
    if format not in FORMATS:
        raise DataError(f"unknown synthetic dataset format '{format}'; valid: {', '.join(FORMATS)}")
    if num_classes < 2:
        raise DataError(f"a synthetic dataset needs at least 2 classes, got {num_classes}")
    if train_per_class < 0 or test_per_class < 0 or train_per_class + test_per_class == 0:
        raise DataError("train_per_class and test_per_class must be >= 0 and not both 0")


def _check_layout(format: str, layout: str) -> None:
    """Refuse an unknown Stanford Cars layout."""
    if format == "stanford_cars":
        # optional: SciPy (the train extra), imported only when this runs
        from finegrain.data.stanford_cars import LAYOUTS

        if layout not in LAYOUTS:
            raise DataError(f"unknown Stanford Cars layout '{layout}'; valid: {', '.join(LAYOUTS)}")


def _render_splits(num_classes: int, per_split: dict[str, int], size: tuple[int, int], seed: int) -> dict[str, list]:
    """(image, label, bbox) of every image of each split with images, classes interleaved."""
    samples: dict[str, list] = {}
    for split, per_class in per_split.items():
        if per_class == 0:
            continue
        out = []
        for i in range(per_class):  # interleave classes, as real lists are not sorted by class
            for label in range(num_classes):
                rng = np.random.default_rng([seed, _SPLIT_IDS[split], label, i])
                im, bbox = render(label, num_classes, size, rng)
                out.append((im, label, bbox))
        samples[split] = out
    return samples


def _write_format(root: Path, format: str, names: list[str], samples: dict[str, list], layout: str) -> None:
    """Write the rendered images and their label files in ``format``'s layout."""
    num_classes = len(names)
    if format == "stanford_cars":
        # optional: SciPy (the train extra), imported only when this runs
        from finegrain.data.stanford_cars import write_stanford_cars

        write_stanford_cars(root, names, samples, layout=layout)
        _fix_mat_headers(root)
    elif format == "tiny_imagenet":
        wnids = [f"n{label + 1:08d}" for label in range(num_classes)]
        words = dict(zip(wnids, names, strict=True))
        splits = {"val" if k == "test" else k: v for k, v in samples.items()}
        write_tiny_imagenet(root, wnids, words, splits)
    else:
        write_image_folder(root, names, {k: [(im, label) for im, label, _ in v] for k, v in samples.items()})


def make_synthetic(
    root: Path | str,
    format: str = "stanford_cars",
    num_classes: int = 16,
    train_per_class: int = 24,
    test_per_class: int = 12,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    layout: str = "devkit",
) -> Path:
    """Write the synthetic dataset at ``root`` in ``format`` and return ``root``.

    ``format``: ``stanford_cars`` (with ``layout`` ``devkit``, ``all_images`` or
    ``kaggle``), ``tiny_imagenet`` (the test images become the labelled ``val``
    split) or ``image_folder`` (``train/<class>/`` and ``test/<class>/``). ``size``
    is ``(H, W)``. Same arguments, same bytes. A folder holding an earlier
    synthetic dataset is replaced; any other non-empty folder is refused.
    """
    _check_args(format, num_classes, train_per_class, test_per_class)
    size = (int(size[0]), int(size[1]))
    root = Path(root).expanduser()
    _check_layout(format, layout)
    args = {
        "format": format,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "size": list(size),
        "seed": seed,
        "layout": layout if format == "stanford_cars" else None,
    }
    _prepare_root(root, args)
    names = class_names_for(num_classes)
    samples = _render_splits(num_classes, {"train": train_per_class, "test": test_per_class}, size, seed)
    _write_format(root, format, names, samples, layout)
    return root
