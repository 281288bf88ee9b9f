"""Opening one image file safely: every failure becomes an :class:`ImageError`
that names the file, and every unusual pixel format is converted to 8-bit RGB
with a note saying what was converted."""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from finegrain.errors import ImageError

# Pillow's own decompression-bomb limit (about 179 Mpixel) is kept; above it an
# image is refused rather than decoded.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def open_rgb(path: str | Path) -> tuple[Image.Image, str | None]:
    """Decode ``path`` fully and return ``(rgb_image, conversion)``.

    ``conversion`` is ``None`` for a plain 8-bit RGB file, otherwise one of
    ``greyscale``, ``cmyk``, ``alpha``, ``palette``, ``16-bit``, ``other:<mode>``.
    EXIF orientation is applied. Raises :class:`ImageError` for a missing,
    empty, non-image, truncated, corrupt or over-large file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(path, "missing", "no such file") from None
    except OSError as e:
        raise ImageError(path, "missing", str(e)) from None
    if size == 0:
        raise ImageError(path, "empty", "zero-byte file")
    try:
        with open(path, "rb") as f:
            return decode(f, path)
    except OSError as e:
        raise ImageError(path, "missing", str(e)) from None


def decode_bytes(data: bytes, name: str = "upload") -> Image.Image:
    """Decode in-memory bytes (an upload) into 8-bit RGB under :func:`open_rgb`'s rules."""
    if not data:
        raise ImageError(name, "empty", "the uploaded file is empty")
    return decode(io.BytesIO(data), name)[0]


_OPEN_LOCK = threading.Lock()  # warnings filters are process-global: one header parse at a time


def decode(source: BinaryIO, name: str | Path) -> tuple[Image.Image, str | None]:
    """Fully decode ``source`` to ``(rgb_image, conversion)``; every failure is an :class:`ImageError` naming ``name``."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source)  # header only: the bomb check happens here
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.width * im.height > limit:  # also when another thread's filters were in force
            raise Image.DecompressionBombError(
                f"image of {im.width}x{im.height} = {im.width * im.height} pixels is over the limit of {limit}")
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)
    except UnidentifiedImageError:
        raise ImageError(name, "not-an-image", "not a format Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, "too-large", str(e)) from None
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ImageError(name, reason, str(e)) from None
    except Exception as e:  # noqa: BLE001 - decoders raise SyntaxError, ValueError, EOFError, ... on bad data
        raise ImageError(name, "corrupt", str(e) or type(e).__name__) from None


def to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any Pillow mode to 8-bit RGB; return the image and what was done."""
    mode = im.mode
    if mode == "RGB":
        return im, None
    if mode in ("L", "1"):
        return im.convert("RGB"), "greyscale"
    if mode == "CMYK":
        return im.convert("RGB"), "cmyk"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), "alpha"
    if mode == "P":
        return im.convert("RGB"), "palette"
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB"), "16-bit"
    return im.convert("RGB"), f"other:{mode}"


def load_resized(
    path: str | Path,
    size: tuple[int, int],
    bbox: tuple[int, int, int, int] | None = None,
    bbox_margin: float = 0.0,
) -> np.ndarray:
    """Open, optionally crop to ``bbox`` (+ a relative ``bbox_margin``), resize.

    ``size`` is ``(height, width)``. Returns a ``uint8`` array ``[H, W, 3]``.
    This is the single decode path: the prepared cache stores exactly its output,
    so cached and uncached loading give the same pixels.
    """
    im, _ = open_rgb(path)
    if bbox is not None:
        im = im.crop(expand_box(bbox, bbox_margin, im.width, im.height))
    return resize_rgb(im, size)


def resize_rgb(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB image to ``size`` = (height, width); returns uint8 ``[H, W, 3]``."""
    h, w = size
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.array(im, dtype=np.uint8)  # writable: loaders hand out views of it


def expand_box(
    bbox: tuple[int, int, int, int], margin: float, width: int, height: int
) -> tuple[int, int, int, int]:
    """Grow an inclusive ``(x1, y1, x2, y2)`` box by ``margin`` of its size on each
    side, clip it to the image, and return a Pillow crop box (exclusive right/bottom)."""
    x1, y1, x2, y2 = bbox
    bw, bh = x2 - x1 + 1, y2 - y1 + 1
    dx, dy = margin * bw, margin * bh
    left = max(0, int(round(x1 - dx)))
    top = max(0, int(round(y1 - dy)))
    right = min(width, int(round(x2 + 1 + dx)))
    bottom = min(height, int(round(y2 + 1 + dy)))
    if right <= left or bottom <= top:  # a box outside the image: keep the whole image
        return 0, 0, width, height
    return left, top, right, bottom
