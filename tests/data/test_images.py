"""Decoding images: the pixel conversions stay exact, and the decode budget (``max_pixels``)
keeps big images cheap — refused from their header, or JPEGs decoded at a reduced scale."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain.data import images
from finegrain.data.images import (
    DEFAULT_MAX_IMAGE_MPIXELS,
    decode,
    decode_bytes,
    load_resized,
    open_rgb,
)
from finegrain.errors import ImageError

BUDGET_MB = 300
DEFAULT_LIMIT = int(DEFAULT_MAX_IMAGE_MPIXELS * 1e6)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def reference_rgb(im: Image.Image) -> np.ndarray:
    """The conversions as they were before the decode budget: whole-image, float64."""
    mode = im.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.asarray(Image.fromarray(arr8).convert("RGB"))
    return np.asarray(im.convert("RGB"))


# ----------------------------------------------------------------------------- exact pixels


def test_every_16bit_value_converts_as_the_float_formula():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    src = Image.fromarray(values)
    assert src.mode == "I;16"
    out, conversion = decode(io.BytesIO(encode(src)), "deep.png")
    assert conversion == "16-bit" and out.mode == "RGB"
    expected = np.clip(values / 65535 * 255 + 0.5, 0, 255).astype(np.uint8)
    got = np.asarray(out)
    assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 2], expected)


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "P", "P+transparency", "RGBA", "LA", "CMYK", "I;16", "I", "F"])
def test_conversions_strip_by_strip_equal_whole_image(monkeypatch, mode):
    """Strips of 1000 pixels (3 rows here) give exactly the pixels of one whole-image conversion."""
    monkeypatch.setattr(images, "_STRIP_PIXELS", 1000)
    rng = np.random.default_rng(1)
    h, w = 37, 300
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "I":
        im = Image.fromarray(rng.integers(-50, 70000, (h, w), dtype=np.int32))
    elif mode == "F":
        im = Image.fromarray(rng.normal(120, 90, (h, w)).astype(np.float32))
    elif mode == "P+transparency":
        im = rgba.convert("RGB").convert("P")
        im.info["transparency"] = 7
    else:
        im = rgba.convert(mode)
    assert im.mode == mode.split("+")[0]
    assert np.array_equal(np.asarray(images.to_rgb(im)[0]), reference_rgb(im))


def test_limit_changes_nothing_for_images_within_it(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(path, quality=90)
    plain = load_resized(path, (64, 80))
    assert np.array_equal(load_resized(path, (64, 80), max_pixels=120 * 160), plain)
    assert np.array_equal(np.asarray(open_rgb(path, max_pixels=DEFAULT_LIMIT)[0]), np.asarray(open_rgb(path)[0]))


def test_exif_orientation_is_still_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    src = Image.new("RGB", (40, 20), (200, 30, 30))
    src.paste((30, 30, 200), (0, 0, 10, 20))  # a blue band on the left
    out, _ = decode(io.BytesIO(encode(src, "JPEG", exif=exif.tobytes(), quality=95)), "turned.jpg")
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 150 and top[0] < 100  # the left band is now on top


# ----------------------------------------------------------------------------- the limit


def test_over_the_limit_is_refused_naming_the_limit(tmp_path):
    data = encode(Image.new("L", (3000, 2000)))
    with pytest.raises(ImageError) as e:
        decode_bytes(data, "wide.png", max_pixels=5_000_000)
    assert e.value.reason == "too-large"
    assert "3000x2000" in e.value.detail and "5 Mpixel" in e.value.detail
    path = tmp_path / "wide.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="too-large"):
        open_rgb(path, max_pixels=5_000_000)
    with pytest.raises(ImageError, match="too-large"):
        load_resized(path, (32, 32), max_pixels=5_000_000)
    assert open_rgb(path)[0].size == (3000, 2000)  # the library's default is Pillow's limit only


def test_big_jpeg_is_decoded_reduced_within_the_limit():
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
    src = Image.fromarray(small).resize((2000, 1500), Image.Resampling.BILINEAR)
    data = encode(src, "JPEG", quality=92)
    full = decode_bytes(data)
    assert full.size == (2000, 1500)
    half = decode_bytes(data, max_pixels=1_000_000)  # 3 Mpixel: 1/2 scale is 0.75 Mpixel
    assert half.size == (1000, 750)
    eighth = decode_bytes(data, max_pixels=50_000)  # only 1/8 fits: 250x188
    assert eighth.size == (250, 188)
    expected = np.asarray(full.resize(half.size, Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(half, dtype=np.float64) - expected).mean() < 3  # the same picture
    with pytest.raises(ImageError, match="too-large"):
        decode_bytes(data, max_pixels=40_000)  # not even 1/8 fits


# ----------------------------------------------------------------------------- peak memory


_MEASURE = """
import json, resource, sys
from finegrain.data.images import decode_bytes
from finegrain.errors import ImageError
data = open(sys.argv[1], "rb").read()
limit = None if sys.argv[2] == "none" else int(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    im = decode_bytes(data, "upload", max_pixels=limit)
    result = {"size": list(im.size), "mode": im.mode}
except ImageError as e:
    result = {"reason": e.reason, "detail": e.detail}
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": (after - before) / 1024, **result}))
"""


def decode_peak(path: Path, limit: int | None = DEFAULT_LIMIT) -> dict:
    """Decode ``path`` in a fresh process; its peak memory growth (MB) and what came out."""
    pytest.importorskip("resource")
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), "none" if limit is None else str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("big")
    files = {}
    # the attack: a 16-bit greyscale PNG of 9400x9400 (88 Mpixel, under Pillow's bomb limit), ~190 KB
    row = (np.arange(9400, dtype=np.uint32) * 6 % 65536).astype(np.uint16)
    deep = Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (9400, 9400))))
    assert deep.mode == "I;16"
    files["deep88"] = d / "deep88.png"
    deep.save(files["deep88"])
    del deep
    files["deep16"] = d / "deep16.png"  # 16-bit at exactly the default limit: decoded
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(row[:4000], (4000, 4000)))).save(files["deep16"])
    files["palette88"] = d / "palette88.png"
    Image.new("P", (9400, 9400)).save(files["palette88"])
    files["rgb18"] = d / "rgb18.png"
    Image.new("RGB", (6000, 3000), (20, 120, 220)).save(files["rgb18"])
    files["rgba16"] = d / "rgba16.png"  # the costliest conversion (alpha over white) at the default limit
    Image.new("RGBA", (4000, 4000), (20, 120, 220, 128)).save(files["rgba16"])
    files["jpeg24"] = d / "jpeg24.jpg"
    Image.new("RGB", (6000, 4000), (200, 60, 20)).save(files["jpeg24"], quality=85)
    return files


def test_16bit_88_mpixel_png_stays_within_the_budget(big_files):
    """The reported attack: 172 KB that cost 3.3 GB. Refused from its header now."""
    assert big_files["deep88"].stat().st_size < 1_000_000
    r = decode_peak(big_files["deep88"])
    assert r["peak_mb"] < BUDGET_MB, r
    assert r["reason"] == "too-large" and "9400x9400" in r["detail"] and "16 Mpixel" in r["detail"]


def test_16bit_png_at_the_limit_decodes_without_float64(big_files):
    """16 Mpixel of 16-bit: a float64 copy alone would be 128 MB (about 500 MB in all before)."""
    r = decode_peak(big_files["deep16"])
    assert r == {**r, "size": [4000, 4000], "mode": "RGB"}
    assert r["peak_mb"] < 150, r  # the 16-bit source (32 MB) + 8-bit grey (16 MB) + RGB (64 MB)


@pytest.mark.parametrize("name", ["palette88", "rgb18"])
def test_big_paletted_and_rgb_pngs_are_refused_cheaply(big_files, name):
    r = decode_peak(big_files[name])
    assert r["peak_mb"] < BUDGET_MB, r
    assert r["reason"] == "too-large" and "16 Mpixel" in r["detail"], r


def test_rgba_png_at_the_limit_stays_within_the_budget(big_files):
    r = decode_peak(big_files["rgba16"])
    assert r["size"] == [4000, 4000] and r["mode"] == "RGB"
    assert r["peak_mb"] < 200, r  # RGBA source + RGB result, 64 MB each, + strips


def test_big_jpeg_is_reduced_within_the_budget(big_files):
    r = decode_peak(big_files["jpeg24"])
    assert r["size"] == [3000, 2000], r  # 24 Mpixel decoded at 1/2 scale
    assert r["peak_mb"] < 100, r  # a full decode alone would hold 96 MB


def test_a_folder_given_as_the_image_is_named_a_folder_not_missing(tmp_path):
    with pytest.raises(ImageError) as e:
        images.open_rgb(tmp_path)
    assert e.value.reason == "not-an-image" and "a folder, not an image file" in str(e.value)
