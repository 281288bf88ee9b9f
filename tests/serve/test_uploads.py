"""serve/uploads.py: reading a search request within its limits, ``k``, decoding and the errors
a client sees, on hand-built ASGI requests, then through the whole service over a fake searcher."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from PIL import Image

from finegrain.errors import FinegrainError, ImageError
from finegrain.serve import uploads
from finegrain.serve.errors import ApiError
from finegrain.serve.uploads import (
    DEFAULT_K,
    MULTIPART_OVERHEAD,
    Upload,
    check_headers,
    human,
    image_error_message,
    parse_k,
    read_upload,
    replay,
    search_upload,
)

from .fakes import assert_error, draw_bird, make_app, png_bytes, post_image

BOUNDARY = "b0undary"


def multipart(image: bytes | None = None, filename: str = "q.png", /, **fields: str) -> bytes:
    parts = []
    if image is not None:
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + image
            + b"\r\n"
        )
    for name, value in fields.items():
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def request(
    body: bytes,
    query: str = "",
    chunk: int = 1 << 30,
    length: bool = True,
    ctype: str = f"multipart/form-data; boundary={BOUNDARY}",
) -> Request:
    headers = [(b"content-type", ctype.encode())]
    if length:
        headers.append((b"content-length", str(len(body)).encode()))
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]

    async def receive() -> dict[str, Any]:
        piece = pieces.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/search",
        "headers": headers,
        "query_string": query.encode(),
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
    }
    return Request(scope, receive=receive)


def read(req: Request, max_bytes: int = 1000, gallery_size: int = 24, max_k: int = 20) -> Upload:
    return asyncio.run(read_upload(req, max_bytes, gallery_size, max_k))


def status_of(fn, *args) -> tuple[int, str]:
    with pytest.raises(ApiError) as e:
        fn(*args)
    return e.value.status, e.value.message


# ----------------------------------------------------------------------------- k


def test_k_defaults_to_8_or_the_gallery_size():
    assert parse_k([], [], 24, 20) == DEFAULT_K == 8
    assert parse_k([], [], 5, 20) == 5
    assert parse_k([""], [""], 24, 20) == 8  # an empty field is no value


def test_k_from_the_form_or_the_query():
    assert parse_k([" 3 "], [], 24, 20) == 3
    assert parse_k([], ["20"], 24, 20) == 20


@pytest.mark.parametrize(
    "form_k, query_k, gallery, fragment",
    [
        (["0"], [], 24, "between 1 and 20; got 0"),
        (["21"], [], 24, "between 1 and 20"),
        (["10"], [], 6, "between 1 and 6"),
        (["-1"], [], 24, "whole number"),
        (["2.5"], [], 24, "whole number"),
        (["3"], ["4"], 24, "given 2 times"),
        (["1", "2"], [], 24, "given 2 times"),
        ([], [], 0, "empty"),
        ([b"file"], [], 24, "not a file"),
        (["9" * 400], [], 24, "'99999999…'"),
    ],
)
def test_parse_k_refuses_bad_values_with_422(form_k, query_k, gallery, fragment):
    status, message = status_of(parse_k, form_k, query_k, gallery, 20)
    assert status == 422 and fragment in message and len(message) < 80


# ----------------------------------------------------------------------------- headers and body


def test_human_sizes():
    sizes = (10_000_000, 10 * 2**20, 200_000, 999_999, 12, 1, 3.2e9)
    assert [human(n) for n in sizes] == ["10 MB", "10.49 MB", "200 kB", "1000 kB", "12 bytes", "1 byte", "3.2 GB"]


def test_headers_refuse_a_declared_oversize_body_a_bad_length_or_no_multipart():
    limit = 1000
    check_headers({"content-length": str(limit + MULTIPART_OVERHEAD), "content-type": "multipart/form-data"}, limit)
    assert (
        status_of(
            check_headers,
            {"content-length": str(limit + MULTIPART_OVERHEAD + 1), "content-type": "multipart/form-data"},
            limit,
        )[0]
        == 413
    )
    assert status_of(check_headers, {"content-length": "ten", "content-type": "multipart/form-data"}, limit) == (
        400,
        "invalid Content-Length header",
    )
    assert status_of(check_headers, {"content-type": "image/png"}, limit)[0] == 400


def test_replay_hands_the_body_over_once():
    receive = replay(b"abc")
    assert asyncio.run(receive()) == {"type": "http.request", "body": b"abc", "more_body": False}
    assert asyncio.run(receive()) == {"type": "http.disconnect"}


def test_read_upload_returns_the_image_its_name_and_k():
    up = read(request(multipart(b"PNGDATA", "bird.png", k="3")))
    assert up == Upload(b"PNGDATA", "bird.png", 3)
    assert read(request(multipart(b"x"), query="k=5")).k == 5


def test_an_image_over_the_limit_is_413_however_it_arrives():
    body = multipart(b"\x00" * 1001)
    assert status_of(read, request(body))[0] == 413  # the file itself, within the body's slack
    big = multipart(b"\x00" * (1000 + MULTIPART_OVERHEAD + 10))
    status, message = status_of(read, request(big, length=False, chunk=4096))  # counted while read
    assert status == 413 and "limited to 1 kB." in message


def test_a_form_without_an_image_or_a_malformed_one_is_400():
    assert status_of(read, request(multipart(None, k="3")))[1].startswith("No image")
    assert status_of(read, request(multipart(None, image="just text")))[1].startswith("No image")
    assert status_of(read, request(b"--x\r\ngarbage", ctype="multipart/form-data; boundary=x"))[0] == 400


def test_an_interrupted_upload_is_400():
    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    req = request(multipart(b"x"))
    req = Request(req.scope, receive=receive)
    assert status_of(read, req) == (400, "the upload was interrupted")


# ----------------------------------------------------------------------------- decoding and searching


def test_image_error_messages_name_no_path_and_the_limit_setting():
    assert image_error_message(ImageError("/srv/x.png", "truncated")).startswith("This image is truncated")
    assert "cannot be read" in image_error_message(ImageError("/srv/x.png", "weird"))
    text = image_error_message(ImageError("/srv/x.png", "too-large", "3000x6000 from /srv/secret/x.png"), 16_000_000)
    assert "/srv" not in text and "3000x6000" in text
    assert "16 Mpixel" in text and "--max-image-mpixels" in text


def _png(size: tuple[int, int] = (40, 30)) -> bytes:
    return png_bytes(Image.new("RGB", size, (10, 20, 30)))


class _Recorder:
    """Just enough of a searcher for ``search_upload``: records what it was given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.seen: list[tuple[tuple[int, int], int]] = []

    def search(self, image: Image.Image, k: int = 10):
        if self.error:
            raise self.error
        self.seen.append((image.size, k))
        return [], None


def _search(searcher: Any, data: bytes, max_pixels: int | None = None, k: int = 2):
    return asyncio.run(search_upload(searcher, Upload(data, "q.png", k), max_pixels, asyncio.Semaphore(1)))


def test_search_upload_decodes_then_searches():
    rec = _Recorder()
    assert _search(rec, _png((40, 30)), k=3) == ([], None)
    assert rec.seen == [((40, 30), 3)]


def test_search_upload_refuses_unreadable_or_too_large_images_with_400():
    with pytest.raises(ApiError) as e:
        _search(_Recorder(), b"not an image")
    assert e.value.status == 400 and "not an image" in e.value.message
    with pytest.raises(ApiError) as e:
        _search(_Recorder(), _png((2000, 1000)), max_pixels=1_000_000)
    assert e.value.status == 400 and "1 Mpixel" in e.value.message


def test_search_upload_turns_a_searcher_refusal_into_422_without_paths():
    with pytest.raises(ApiError) as e:
        _search(_Recorder(FinegrainError("the index in /srv/runs/x/index was built by another model")), _png())
    assert e.value.status == 422 and e.value.message == "the index in index was built by another model"


# ------------------------------------------------------------------ the service: bounded echo of k, decode budget


@pytest.mark.parametrize("k", ["9" * 400, "a" * 400, "1" * 5000, " " * 50 + "x" * 300, "<script>alert(1)</script>"])
def test_bad_k_is_not_echoed_whole(client, blue_query, k):
    body = assert_error(post_image(client, blue_query, k=k), 422, "k")
    assert len(body["error"]) < 120, body["error"]
    assert k.strip()[:9] not in body["error"]  # at most 8 characters of it are quoted


def test_repeated_k_is_refused(client, blue_query):
    files = {"image": ("q.png", blue_query, "image/png")}
    assert_error(client.post("/api/search", files=files, data={"k": ["3", "4"]}), 422, "once")
    assert_error(client.post("/api/search?k=3&k=4", files=files), 422, "once")
    assert_error(client.post("/api/search?k=3", files=files, data={"k": "4"}), 422, "once")
    assert client.post("/api/search?k=3", files=files).json()["k"] == 3


def test_info_reports_the_image_limit(client):
    assert client.get("/api/info").json()["max_image_pixels"] == 16_000_000


def test_image_over_the_pixel_limit_is_400_naming_the_setting(searcher):
    png = png_bytes(Image.new("RGB", (1500, 1000), (40, 70, 200)))
    jpeg = png_bytes(draw_bird((40, 70, 200), 0, size=(1500, 1000)), "JPEG", quality=90)
    with TestClient(make_app(searcher, max_image_pixels=1_000_000)) as c:
        body = assert_error(post_image(c, png, k=2), 400, "too many pixels")
        assert "--max-image-mpixels" in body["error"] and "1 Mpixel" in body["error"]
        assert "1500x1000" in body["error"]
        r = post_image(c, jpeg, name="big.jpg", ctype="image/jpeg", k=3)  # decoded at 1/2 scale instead
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["label"] == "Indigo Bunting"


def test_16bit_png_over_the_default_limit_is_400(client):
    deep = Image.fromarray(np.zeros((3000, 6000), dtype=np.uint16))  # 18 Mpixel of 16-bit, a few KB
    body = assert_error(post_image(client, png_bytes(deep), name="deep.png"), 400, "too many pixels")
    assert "16 Mpixel" in body["error"] and "--max-image-mpixels" in body["error"]


def test_every_format_the_page_and_the_refusal_name_is_one_an_upload_decodes():
    page = (Path(uploads.__file__).parent / "static" / "index.html").read_text()
    on_page = re.search(r'class="dz-sub">.*?· ([^<]+)</p>', page).group(1)
    in_refusal = re.search(r"Upload an? (.+) picture", image_error_message(ImageError("q", "not-an-image"))).group(1)
    assert on_page == in_refusal
    names = re.split(r", | or ", on_page)
    assert names == ["JPEG", "PNG", "WebP", "GIF", "BMP"]
    for fmt in names:
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 30, 10)).save(buf, format=fmt.upper())
        rec = _Recorder()
        _search(rec, buf.getvalue(), k=1)
        assert rec.seen == [((40, 30), 1)], fmt


@pytest.fixture(scope="module")
def jpeg_100_mpixel() -> bytes:
    """An 11648x8736 photo (a 100-Mpixel camera's size, over Pillow's 89.5-Mpixel bomb limit), ~1 MB."""
    return png_bytes(Image.new("L", (11648, 8736), 128), "JPEG")


def test_a_100_mpixel_jpeg_is_decoded_reduced_not_refused(searcher, jpeg_100_mpixel):
    rec = _Recorder()
    _search(rec, jpeg_100_mpixel, max_pixels=16_000_000, k=1)  # 1/4 scale: 1/2 is still 25 Mpixel
    _search(rec, jpeg_100_mpixel, max_pixels=100_000_000, k=1)  # 1/2 scale: whole, it is over Pillow's limit
    assert rec.seen == [((2912, 2184), 1), ((5824, 4368), 1)]
    with TestClient(make_app(searcher, max_upload_bytes=4 * 2**20)) as c:
        r = post_image(c, jpeg_100_mpixel, name="camera.jpg", ctype="image/jpeg", k=2)
        assert r.status_code == 200, r.text


def test_raising_the_pixel_limit_keeps_the_decode_memory_budget(searcher):
    """At --max-image-mpixels 100, a 9400x9400 16-bit PNG (88 Mpixel, 7 bytes a pixel to decode: over
    600 MB) is refused naming the memory budget; a JPEG as large is decoded reduced instead."""
    from finegrain.data.images import DECODE_BUDGET_BYTES, decode_bytes_per_pixel

    deep = png_bytes(Image.new("I;16", (9400, 9400), 300))
    assert 9400 * 9400 * decode_bytes_per_pixel("I;16") > DECODE_BUDGET_BYTES
    with TestClient(make_app(searcher, max_image_pixels=100_000_000)) as c:
        body = assert_error(post_image(c, deep, name="deep.png", k=2), 400, "too many pixels")
        assert "9400x9400" in body["error"] and "300 MB" in body["error"]
    rec = _Recorder()
    small_deep = png_bytes(Image.new("I;16", (5000, 4000), 300))  # 20 Mpixel, 140 MB: within the budget
    _search(rec, small_deep, max_pixels=100_000_000, k=1)
    grey = png_bytes(Image.new("L", (8000, 8000), 3), "JPEG")  # 64 Mpixel, 5 bytes a pixel: 320 MB whole
    _search(rec, grey, max_pixels=100_000_000, k=1)
    assert rec.seen == [((5000, 4000), 1), ((4000, 4000), 1)]
