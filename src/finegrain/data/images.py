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
from finegrain.runs import human_bytes

ORIENTATION_TAG = 0x0112  # EXIF orientation: 5 to 8 turn the picture a quarter

# Pillow's own decompression-bomb limit (about 179 Mpixel) is kept; above it an
# image is refused rather than decoded.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS

# A decode budget for untrusted images (the search service's ``--max-image-mpixels``).
# Decoding costs at most about 8 bytes per pixel here (an RGBA source plus its RGB result;
# Pillow stores RGB in 4 bytes a pixel): 16 Mpixel is about 130 MB and, for the slowest
# kind (an RGBA PNG), under a second of one core. JPEGs above it are decoded at 1/2, 1/4
# or 1/8 scale instead (libjpeg's draft mode), so camera photos are not refused.
DEFAULT_MAX_IMAGE_MPIXELS = 16.0

# The memory one decode of an untrusted image may take, whatever ``--max-image-mpixels`` says:
# an image whose decode would take more (see :func:`decode_bytes_per_pixel`) is decoded reduced
# (a JPEG) or refused, naming the reason.
DECODE_BUDGET_BYTES = 300_000_000

# Rows are converted in strips of about this many pixels, so no conversion holds a
# second full-size copy of a big image (or a float64 one: 8 bytes a pixel).
_STRIP_PIXELS = 1 << 21


def open_rgb(path: str | Path, max_pixels: int | None = None) -> tuple[Image.Image, str | None]:
    """Decode ``path`` fully and return ``(rgb_image, conversion)``.

    ``conversion`` is ``None`` for a plain 8-bit RGB file, otherwise one of
    ``greyscale``, ``cmyk``, ``alpha``, ``palette``, ``16-bit``, ``other:<mode>``.
    EXIF orientation is applied. Raises :class:`ImageError` for a missing,
    empty, non-image, truncated, corrupt or over-large file. ``max_pixels``
    (default: Pillow's bomb limit only) refuses bigger images, except JPEGs,
    which are decoded reduced to fit (see :func:`decode`).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(path, "missing", "no such file") from None
    except OSError as e:
        raise ImageError(path, "missing", str(e)) from None
    if path.is_dir():
        raise ImageError(path, "not-an-image", "a folder, not an image file")
    if size == 0:
        raise ImageError(path, "empty", "zero-byte file")
    try:
        with open(path, "rb") as f:
            return decode(f, path, max_pixels=max_pixels)
    except OSError as e:
        raise ImageError(path, "missing", str(e)) from None


def decode_bytes(data: bytes, name: str = "upload", max_pixels: int | None = None) -> Image.Image:
    """Decode in-memory bytes (an upload) into 8-bit RGB under :func:`open_rgb`'s rules."""
    if not data:
        raise ImageError(name, "empty", "the uploaded file is empty")
    return decode(io.BytesIO(data), name, max_pixels=max_pixels)[0]


_OPEN_LOCK = threading.Lock()  # warnings filters are process-global: one header parse at a time


def decode(source: BinaryIO, name: str | Path, max_pixels: int | None = None) -> tuple[Image.Image, str | None]:
    """Fully decode ``source`` to ``(rgb_image, conversion)``; every failure is an :class:`ImageError` naming ``name``.

    With ``max_pixels``, an image with more pixels is refused from its header alone
    (reason ``too-large``, the detail naming the limit), except a JPEG that a 1/2, 1/4 or
    1/8 scale decode brings within the limit: it is decoded at that scale. Images within
    the limit decode exactly as without it.
    """
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # over Pillow's limit, a JPEG may still be decoded reduced (below); twice over it, Pillow refuses
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)  # header only
        _reduce_or_refuse(im, name, max_pixels)
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy when there is nothing to turn
        holder: list[Image.Image] = [im]
        del im  # the conversion may then free a deep source as soon as its 8-bit copy exists
        return _to_rgb_consuming(holder)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not-an-image", "not a format Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError(name, "too-large", str(e)) from None
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ImageError(name, reason, str(e)) from None
    except Exception as e:  # noqa: BLE001 - decoders raise SyntaxError, ValueError, EOFError, ... on bad data
        raise ImageError(name, "corrupt", str(e) or type(e).__name__) from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as :func:`open_rgb` gives it (EXIF orientation applied), from
    its header only; an :class:`ImageError` for a file that is not a readable image."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # header only
                w, h = im.size
                turned = im.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise ImageError(path, "not-an-image", str(e) or type(e).__name__) from None
    return (w, h) if turned else (h, w)


def _mpixels(n: float) -> str:
    return f"{n / 1e6:.3g} Mpixel"


def decode_bytes_per_pixel(mode: str) -> int:
    """About what decoding a pixel of ``mode`` to 8-bit RGB takes: the source as Pillow stores it,
    the RGB result (4 bytes a pixel) unless the source is RGB, and an 8-bit step for deep images."""
    source = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    deep = mode.startswith("I;16") or mode in ("I", "F")
    return source + (0 if mode == "RGB" else 4) + (1 if deep else 0)


def _reduce_or_refuse(im: Image.Image, name: str | Path, max_pixels: int | None) -> None:
    """Keep a decode within Pillow's bomb limit and, with ``max_pixels`` (an untrusted image),
    within ``max_pixels`` and :data:`DECODE_BUDGET_BYTES`: set a JPEG's draft scale so it fits,
    or raise ``too-large`` naming the limit it is over."""
    w, h = im.size
    limits = [(Image.MAX_IMAGE_PIXELS, "the limit of {}")] if Image.MAX_IMAGE_PIXELS else []
    if max_pixels is not None:
        per_pixel = decode_bytes_per_pixel(im.mode)
        budget = f"the {human_bytes(DECODE_BUDGET_BYTES)} one decode may take "
        budget += f"({per_pixel} bytes a pixel for {im.mode}: {{}})"
        limits += [(max_pixels, "the limit of {}"), (DECODE_BUDGET_BYTES // per_pixel, budget)]
    if not limits:
        return
    fit, words = min(limits)
    if w * h <= fit:
        return
    if im.format in ("JPEG", "MPO"):
        for s in (2, 4, 8):
            if -(-w // s) * -(-h // s) <= fit:
                im.draft(None, (max(1, w // s), max(1, h // s)))
                break
    if im.width * im.height > fit:
        raise ImageError(name, "too-large", f"{w}x{h} = {_mpixels(w * h)}, over {words.format(_mpixels(fit))}")


def to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any Pillow mode to 8-bit RGB; return the image and what was done."""
    return _to_rgb_consuming([im])


def _to_rgb_consuming(holder: list[Image.Image]) -> tuple[Image.Image, str | None]:
    """:func:`to_rgb` of ``holder[0]``, dropping the holder's reference to a deep image once
    its 8-bit copy exists (so a caller that passes its only reference frees it early)."""
    im = holder[0]
    mode = im.mode
    if mode == "RGB":
        return im, None
    if mode in ("L", "1"):
        return im.convert("RGB"), "greyscale"
    if mode == "CMYK":
        return im.convert("RGB"), "cmyk"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        return _over_white(im), "alpha"
    if mode == "P":
        return im.convert("RGB"), "palette"
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _deep_to_l(im)
        holder.clear()
        del im
        return grey.convert("RGB"), "16-bit"
    return im.convert("RGB"), f"other:{mode}"


def _strips(im: Image.Image):
    """Row boxes ``(0, top, width, bottom)`` covering ``im`` in strips of about ``_STRIP_PIXELS``."""
    rows = max(1, _STRIP_PIXELS // max(1, im.width))
    for top in range(0, im.height, rows):
        yield 0, top, im.width, min(im.height, top + rows)


def _over_white(im: Image.Image) -> Image.Image:
    """Composite an image with alpha over white, strip by strip (per pixel: the same
    result as one ``alpha_composite`` of the whole image, without its full-size copies)."""
    out = Image.new("RGB", im.size)
    for box in _strips(im):
        rgba = im.crop(box).convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(background, rgba).convert("RGB"), box[:2])
    return out


# round(v / 65535 * 255) for every 16-bit v, as the float formula below gives it:
# floor(v / 257 + 1/2), computed exactly in integers.
_U16_TO_U8 = ((2 * np.arange(65536, dtype=np.uint32) + 257) // 514).astype(np.uint8)


def _deep_to_l(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float greyscale to 8-bit ``L``: 65535 (or 255 when all
    values fit in 8 bits, for ``I`` and ``F``) maps to 255, rounded to nearest; converted
    strip by strip (never a float64 copy of the whole image)."""
    out = np.empty((im.height, im.width), dtype=np.uint8)
    if im.mode.startswith("I;16"):
        for _, top, _, bottom in _strips(im):
            np.take(_U16_TO_U8, np.asarray(im.crop((0, top, im.width, bottom))), out=out[top:bottom])
        return Image.fromarray(out)  # uint8 2-D: mode L
    top_value = np.max([np.max(np.asarray(im.crop(box), dtype=np.float64)) for box in _strips(im)])
    hi = 65535.0 if top_value > 255 else 255.0  # NaN propagates as in one max over the image
    for _, top, _, bottom in _strips(im):
        arr = np.asarray(im.crop((0, top, im.width, bottom)), dtype=np.float64)
        out[top:bottom] = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # uint8 2-D: mode L


def load_resized(
    path: str | Path,
    size: tuple[int, int],
    bbox: tuple[int, int, int, int] | None = None,
    bbox_margin: float = 0.0,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Open, optionally crop to ``bbox`` (+ a relative ``bbox_margin``), resize.

    ``size`` is ``(height, width)``. Returns a ``uint8`` array ``[H, W, 3]``.
    This is the single decode path: the prepared cache stores exactly its output,
    so cached and uncached loading give the same pixels. ``max_pixels`` as in :func:`open_rgb`.
    """
    im, _ = open_rgb(path, max_pixels=max_pixels)
    if bbox is not None:
        im = im.crop(expand_box(bbox, bbox_margin, im.width, im.height))
    return resize_rgb(im, size)


def resize_rgb(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB image to ``size`` = (height, width); returns uint8 ``[H, W, 3]``."""
    h, w = size
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.array(im, dtype=np.uint8)  # writable: loaders hand out views of it


def expand_box(bbox: tuple[int, int, int, int], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
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
