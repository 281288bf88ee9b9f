"""The search service's JSON API, page and gallery, against a fake searcher (no model, no index).

Hosts and security headers are tested in test_security.py, error bodies and server paths in
test_errors.py, ``k`` and the pixel budget in test_uploads.py, ``serve`` in test_serve_command.py."""

from __future__ import annotations

import asyncio
import io
import re
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from .fakes import (
    CLASSES,
    PER_CLASS,
    FakeSearcher,
    assert_error,
    make_app,
    png_bytes,
    post_image,
)

# ----------------------------------------------------------------------------- service


def test_health(client):
    r = client.get("/api/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_info(client, searcher):
    info = client.get("/api/info").json()
    assert info["run"] == "fake-run"
    assert info["model"] == "tiny_cnn"
    assert info["task"] == "classification"
    assert info["dataset"] == "synthetic-birds"
    assert info["gallery_size"] == searcher.gallery_size == len(CLASSES) * PER_CLASS
    assert info["embedding_dim"] == 3
    assert info["metric"] == "cosine" and info["index_kind"] == "flat"
    assert info["has_classifier"] is True
    assert info["created_at"] == "2024-01-01T00:00:00Z"
    assert info["max_upload_bytes"] == 200_000 and info["max_k"] == 20


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    assert spec["info"]["title"] == "finegrain search"
    assert "api/search" in spec["info"]["description"]
    for path in ("/api/search", "/api/health", "/api/info", "/gallery/{image_id}"):
        assert path in spec["paths"], path
    body = spec["paths"]["/api/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "image" in body["properties"] and "k" in body["properties"]
    assert client.get("/docs").status_code == 200


def test_page_and_assets_have_no_external_references(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "finegrain" in html
    assert 'id="dropzone"' in html and 'type="file"' in html
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:href|src)="(/static/[^"]+)"', html)
    assert {"/static/app.css", "/static/app.js"} <= set(assets)
    texts = [html]
    for a in assets:
        r = client.get(a)
        assert r.status_code == 200, a
        texts.append(r.text)
    assert client.get("/static/app.css").headers["content-type"].startswith("text/css")
    assert "javascript" in client.get("/static/app.js").headers["content-type"]
    for t in texts:
        t = t.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a namespace name, never fetched
        assert not re.search(r"https?://", t), "external reference in page assets"
        assert "@import" not in t and "//cdn" not in t


# ----------------------------------------------------------------------------- search


def test_search_returns_results_and_prediction(client, blue_query):
    r = post_image(client, blue_query, k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"prediction", "prediction_source", "results", "query_ms", "k"}
    assert body["prediction_source"] == "classifier"
    assert body["k"] == 5 and len(body["results"]) == 5
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(h["label"] == "Indigo Bunting" for h in body["results"][:PER_CLASS])
    for h in body["results"]:
        assert set(h) == {"rank", "id", "label", "score", "same_image", "url"}
        assert h["same_image"] is False
        assert h["url"] == f"/gallery/{h['id']}"
        assert client.get(h["url"]).status_code == 200
    pred = body["prediction"]
    assert len(pred) == 5 and pred[0]["label"] == "Indigo Bunting"
    assert set(pred[0]) == {"label", "probability"}
    probs = [p["probability"] for p in pred]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert body["query_ms"] >= 0


def test_search_reports_which_hit_is_the_query_itself(gallery_dir, blue_query):
    searcher = FakeSearcher(gallery_dir)
    plain_search = searcher.search

    def search(image, k=10):  # as the real Searcher marks a gallery copy of the query
        hits, top = plain_search(image, k)
        hits[0].same_image = True
        return hits, top

    searcher.search = search
    with TestClient(make_app(searcher)) as c:
        results = post_image(c, blue_query, k=3).json()["results"]
    assert [h["same_image"] for h in results] == [True, False, False]


def test_search_default_k_and_k_in_query(client, blue_query):
    assert post_image(client, blue_query).json()["k"] == 8
    r = client.post("/api/search?k=3", files={"image": ("q.png", blue_query, "image/png")})
    assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_search_without_classifier_has_null_prediction(tmp_path, gallery_dir, blue_query):
    with TestClient(make_app(FakeSearcher(gallery_dir, with_classifier=False))) as c:
        assert c.get("/api/info").json()["has_classifier"] is False
        body = post_image(c, blue_query, k=2).json()
    assert body["prediction"] is None and len(body["results"]) == 2


def test_unusual_image_modes_are_accepted(client):
    for im in (
        Image.new("L", (40, 30), 128),
        Image.new("RGBA", (40, 30), (10, 200, 10, 100)),
        Image.new("P", (40, 30)),
        Image.new("I;16", (40, 30), 30000),
    ):
        r = post_image(client, png_bytes(im), k=2)
        assert r.status_code == 200, (im.mode, r.text)
    gif = png_bytes(Image.new("RGB", (30, 30), (200, 10, 10)), "GIF")
    assert post_image(client, gif, name="a.gif", ctype="image/gif", k=1).status_code == 200


# ----------------------------------------------------------------------------- gallery


def test_gallery_serves_indexed_images(client, searcher):
    r = client.get("/gallery/0")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert "max-age" in r.headers["cache-control"]
    assert r.headers.get("etag") and r.headers.get("last-modified")
    assert r.content == Path(searcher.gallery_path(0)).read_bytes()
    Image.open(io.BytesIO(r.content)).verify()
    jpg = client.get("/gallery/1")  # 00_1.jpg
    assert jpg.status_code == 200 and jpg.headers["content-type"] == "image/jpeg"
    last = client.get(f"/gallery/{searcher.gallery_size - 1}")
    assert last.status_code == 200


@pytest.mark.parametrize(
    "ident",
    [
        "24",
        "9999",
        "99999999999999999999",
        "-1",
        "1.0",
        "0x1",
        " 1",
        "abc",
        "..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "..%2Fetc%2Fpasswd",
        "0%2F..%2F..%2Fetc%2Fpasswd",
    ],
)
def test_gallery_unknown_ids_are_404(client, ident):
    assert_error(client.get(f"/gallery/{ident}"), 404)


def test_gallery_path_traversal_is_404(client):
    for url in (
        "/gallery/../etc/passwd",
        "/gallery/../../etc/passwd",
        "/gallery/0/../../etc/passwd",
        "/static/../app.py",
        "/static/..%2Fapp.py",
        "/gallery/",
    ):
        r = client.get(url)
        assert r.status_code == 404, url
        assert b"root:" not in r.content and b"def create_app" not in r.content


def test_unknown_route_is_json_404(client):
    assert_error(client.get("/nope"), 404)


# ----------------------------------------------------------------------------- bad input


def test_non_image_is_400(client):
    body = assert_error(
        post_image(client, b"hello, I am a text file\n" * 20, name="cat.jpg", ctype="image/jpeg"), 400, "not an image"
    )
    assert "/" not in body["error"].split("(")[0]  # no server paths in the message


def test_empty_file_is_400(client):
    assert_error(post_image(client, b"", name="empty.png"), 400, "empty")


def test_truncated_jpeg_is_400(client, real_jpeg):
    assert_error(
        post_image(client, real_jpeg[: len(real_jpeg) // 2], name="cut.jpg", ctype="image/jpeg"), 400, "truncated"
    )


def test_corrupt_png_is_400(client, blue_query):
    broken = bytearray(blue_query)
    broken[60:200] = b"\x00" * 140  # inside the IDAT data: CRC and zlib stream fail
    assert_error(post_image(client, bytes(broken), name="broken.png"), 400)


def test_oversize_upload_is_413(client):
    big = b"\xff\xd8" + b"\x00" * 300_000
    assert_error(post_image(client, big, name="big.jpg", ctype="image/jpeg"), 413, "too large")


def test_oversize_upload_without_content_length_is_413(client):
    """A chunked body (no Content-Length) is counted while it is read."""
    boundary = "finegrainboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        f"Content-Type: image/png\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks():
        yield head
        for _ in range(40):
            yield b"\x00" * 10_000
        yield tail

    r = client.post(
        "/api/search", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413)


def test_lying_content_length_is_413(client):
    assert_error(
        client.post(
            "/api/search",
            content=b"x",
            headers={"content-type": "multipart/form-data; boundary=b", "content-length": str(10**9)},
        ),
        413,
    )


def test_decompression_bomb_is_400(client, bomb_png):
    assert len(bomb_png) < 200_000  # under the upload limit: refused for its pixels, not its bytes
    assert_error(post_image(client, bomb_png, name="bomb.png"), 400, "too many pixels")


def test_image_just_over_pixel_limit_is_400(client):
    """Between Pillow's warning and error thresholds: refused too, not decoded."""
    big = png_bytes(Image.new("1", (14000, 14000)))  # 196 Mpixel > 178,956,970
    assert_error(post_image(client, big, name="big.png"), 400, "too many pixels")


@pytest.mark.parametrize("k", ["0", "-3", "21", "25", "1000", "abc", "2.5"])
def test_bad_k_is_422(client, blue_query, k):
    assert_error(post_image(client, blue_query, k=k), 422, "k")


def test_k_above_gallery_size_is_422(gallery_dir, blue_query):
    with TestClient(make_app(FakeSearcher(gallery_dir), max_k=100)) as c:
        assert post_image(c, blue_query, k=24).status_code == 200
        assert_error(post_image(c, blue_query, k=25), 422, "between 1 and 24")


def test_k_in_query_out_of_range_is_422(client, blue_query):
    assert_error(client.post("/api/search?k=0", files={"image": ("q.png", blue_query, "image/png")}), 422)


def test_missing_image_field_and_wrong_content_type_are_400(client, blue_query):
    assert_error(client.post("/api/search", data={"k": "3"}), 400, "image")
    assert_error(client.post("/api/search", files={"picture": ("q.png", blue_query, "image/png")}), 400, "image")
    assert_error(client.post("/api/search", data={"image": "not a file"}), 400, "image")
    assert_error(client.post("/api/search", content=blue_query, headers={"content-type": "image/png"}), 400)
    assert_error(
        client.post(
            "/api/search", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"}
        ),
        400,
    )


def test_server_still_answers_after_bad_input(client, searcher, blue_query, real_jpeg, bomb_png):
    post_image(client, b"\x00" * 10, name="x.jpg")
    post_image(client, real_jpeg[:500], name="cut.jpg")
    post_image(client, bomb_png)
    post_image(client, b"x" * 300_000)
    post_image(client, blue_query, k=0)
    before = searcher.calls
    r = post_image(client, blue_query, k=4)
    assert r.status_code == 200 and len(r.json()["results"]) == 4
    assert searcher.calls == before + 1
    assert client.get("/api/health").json() == {"status": "ok"}


# ----------------------------------------------------------------------------- concurrency


def test_inference_runs_off_the_event_loop_behind_a_semaphore(gallery_dir, blue_query):
    searcher = FakeSearcher(gallery_dir, delay=0.15)
    app = make_app(searcher, max_concurrency=2)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8000") as ac:

            async def one():
                return await ac.post(
                    "/api/search", files={"image": ("q.png", blue_query, "image/png")}, data={"k": "3"}
                )

            t0 = time.perf_counter()
            health_during = asyncio.create_task(ac.get("/api/health"))
            rs = await asyncio.gather(*(one() for _ in range(6)))
            health = await health_during
            return rs, health, time.perf_counter() - t0

    rs, health, elapsed = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    assert health.status_code == 200
    assert searcher.on_event_loop is False
    assert searcher.max_active == 2  # never more than max_concurrency at once
    assert elapsed >= 3 * 0.15 * 0.9  # 6 requests, 2 at a time
