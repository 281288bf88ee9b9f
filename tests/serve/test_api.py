"""The search service's JSON API, page and gallery, against a fake searcher (no model, no index)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from finegrain.errors import FinegrainError
from finegrain.retrieval.searcher import Hit
from finegrain.serve.app import create_app

CLASSES = [
    ("Indigo Bunting", (40, 70, 200)),
    ("Scarlet Tanager", (205, 40, 45)),
    ("American Goldfinch", (235, 200, 40)),
    ("Green Jay", (40, 160, 90)),
    ("Orange-crowned Warbler", (240, 130, 40)),
    ("Gray Catbird", (120, 125, 135)),
]
PER_CLASS = 4


def draw_bird(color: tuple[int, int, int], variant: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A small synthetic picture: a sky-to-grass gradient and a bird-ish blob of ``color``."""
    w, h = size
    y = np.linspace(0, 1, h)[:, None, None]
    sky = np.array([200, 222, 245]) * (1 - y) + np.array([160, 200, 150]) * y
    arr = np.broadcast_to(sky, (h, w, 3)).astype(np.uint8).copy()
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    u = w / 160  # features scale with the picture
    cx = int(w * (0.42 + 0.08 * (variant % 3)))
    cy = int(h * (0.47 + 0.04 * (variant % 2)))
    rw, rh = int(w * 0.2), int(h * 0.19)
    hx, hy, hr = cx + rw - int(4 * u), cy - rh - int(2 * u), int(15 * u)
    dark = tuple(int(c * 0.6) for c in color)
    d.rectangle([0, int(h * 0.72), w, int(h * 0.76)], fill=(110, 80, 50))  # branch
    d.polygon([(cx - rw + 6 * u, cy), (cx - rw - 30 * u, cy - (10 - 5 * variant) * u),
               (cx - rw - 26 * u, cy + 14 * u)], fill=dark)  # tail
    d.ellipse([cx - rw, cy - rh, cx + rw, cy + rh], fill=color)  # body
    d.ellipse([cx - rw * 0.5, cy - rh * 0.2, cx + rw * 0.4, cy + rh * 0.6], fill=dark)  # wing
    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=color)  # head
    d.polygon([(hx + hr - 2 * u, hy - 4 * u), (hx + hr + 12 * u, hy), (hx + hr - 2 * u, hy + 4 * u)],
              fill=(60, 50, 40))  # beak
    d.ellipse([hx + 3 * u, hy - 6 * u, hx + 9 * u, hy], fill=(20, 20, 20))  # eye
    d.line([(cx - 4 * u, cy + rh), (cx - 4 * u, h * 0.72)], fill=(60, 50, 40), width=max(1, int(2 * u)))  # legs
    d.line([(cx + 6 * u, cy + rh), (cx + 6 * u, h * 0.72)], fill=(60, 50, 40), width=max(1, int(2 * u)))
    return im


def _mean_color(im: Image.Image) -> np.ndarray:
    small = np.asarray(im.convert("RGB").resize((32, 24)), dtype=np.float32) / 255.0
    # weight the centre, where the bird is
    return small[4:20, 6:26].reshape(-1, 3).mean(0)


class FakeSearcher:
    """Duck-typed stand-in for :class:`finegrain.retrieval.searcher.Searcher`.

    The gallery is PNG files in ``root`` (one JPEG too); the "embedding" is the
    centred mean colour, so hits are deterministic and sensible.
    """

    def __init__(self, root: Path, with_classifier: bool = True, delay: float = 0.0) -> None:
        root.mkdir(parents=True, exist_ok=True)
        paths, labels = [], []
        for c, (name, color) in enumerate(CLASSES):
            for v in range(PER_CLASS):
                ext = "jpg" if (c, v) == (0, 1) else "png"
                p = root / f"{c:02d}_{v}.{ext}"
                if not p.exists():
                    draw_bird(color, v).save(p)
                paths.append(str(p))
                labels.append(c)
        self.class_names = [n for n, _ in CLASSES]
        self.has_classifier = with_classifier
        self.delay = delay
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self.on_event_loop = False
        self._lock = threading.Lock()
        emb = np.stack([_mean_color(Image.open(p)) for p in paths])
        self._emb = self._norm(emb)
        self.run = SimpleNamespace(name="fake-run", path=root)
        self.cfg = SimpleNamespace(
            name="fake", task="classification" if with_classifier else "metric_learning",
            data=SimpleNamespace(root="synthetic-birds"), model=SimpleNamespace(backbone="tiny_cnn"),
        )
        self.index = SimpleNamespace(
            paths=paths, labels=np.array(labels), class_names=self.class_names,
            meta={"dim": 3, "metric": "cosine", "kind": "flat", "n": len(paths),
                  "model_checksum": "0" * 64, "created_at": "2024-01-01T00:00:00Z"},
        )

    @staticmethod
    def _norm(e: np.ndarray) -> np.ndarray:
        e = e - 0.5
        return e / (np.linalg.norm(e, axis=-1, keepdims=True) + 1e-8)

    @property
    def gallery_size(self) -> int:
        return len(self.index.paths)

    def search(self, image: Image.Image, k: int = 10):
        try:
            asyncio.get_running_loop()
            self.on_event_loop = True
        except RuntimeError:
            pass
        with self._lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            if k < 1 or k > self.gallery_size:
                raise FinegrainError(f"k must be between 1 and the gallery size ({self.gallery_size}); got {k}")
            q = self._norm(_mean_color(image)[None])[0]
            scores = self._emb @ q
            order = np.argsort(-scores, kind="stable")[:k]
            hits = [Hit(rank=r + 1, id=int(i), label=self.class_names[int(self.index.labels[i])],
                        score=float(scores[i]), path=self.index.paths[i]) for r, i in enumerate(order)]
            top = None
            if self.has_classifier:
                per_class = np.array([scores[self.index.labels == c].mean() for c in range(len(CLASSES))])
                p = np.exp(8 * per_class)
                p /= p.sum()
                best = np.argsort(-p)[:5]
                top = [(self.class_names[c], float(p[c])) for c in best]
            return hits, top
        finally:
            with self._lock:
                self.active -= 1


# ----------------------------------------------------------------------------- fixtures


# The test client sends ``Host: testserver``: allowed here explicitly, never by default.
TEST_HOST = "testserver"


def make_app(searcher, **kw):
    """:func:`create_app` answering to the test client's host name too."""
    return create_app(searcher, allow_hosts=[TEST_HOST], **kw)


def png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gallery")


@pytest.fixture(scope="module")
def searcher(gallery_dir) -> FakeSearcher:
    return FakeSearcher(gallery_dir)


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(make_app(searcher, max_upload_bytes=200_000, max_k=20)) as c:
        yield c


@pytest.fixture(scope="module")
def blue_query() -> bytes:
    return png_bytes(draw_bird((45, 75, 195), 1))


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """400 Mpixel (over twice Pillow's limit), about 50 KB on disk."""
    return png_bytes(Image.new("1", (20000, 20000)))


@pytest.fixture(scope="module")
def real_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(noise), "JPEG", quality=90)


def post_image(client, data: bytes, name: str = "q.png", ctype: str = "image/png", **fields):
    return client.post("/api/search", files={"image": (name, data, ctype)},
                       data={k: str(v) for k, v in fields.items()})


def assert_error(resp, status: int, contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert contains.lower() in body["error"].lower(), body["error"]
    return body


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
    for im in (Image.new("L", (40, 30), 128), Image.new("RGBA", (40, 30), (10, 200, 10, 100)),
               Image.new("P", (40, 30)), Image.new("I;16", (40, 30), 30000)):
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
    assert r.content == Path(searcher.index.paths[0]).read_bytes()
    Image.open(io.BytesIO(r.content)).verify()
    jpg = client.get("/gallery/1")  # 00_1.jpg
    assert jpg.status_code == 200 and jpg.headers["content-type"] == "image/jpeg"
    last = client.get(f"/gallery/{searcher.gallery_size - 1}")
    assert last.status_code == 200


@pytest.mark.parametrize("ident", [
    "24", "9999", "99999999999999999999", "-1", "1.0", "0x1", " 1", "abc", "..%2F..%2Fetc%2Fpasswd",
    "%2Fetc%2Fpasswd", "..%2Fetc%2Fpasswd", "0%2F..%2F..%2Fetc%2Fpasswd",
])
def test_gallery_unknown_ids_are_404(client, ident):
    assert_error(client.get(f"/gallery/{ident}"), 404)


def test_gallery_path_traversal_is_404(client):
    for url in ("/gallery/../etc/passwd", "/gallery/../../etc/passwd", "/gallery/0/../../etc/passwd",
                "/static/../app.py", "/static/..%2Fapp.py", "/gallery/"):
        r = client.get(url)
        assert r.status_code == 404, url
        assert b"root:" not in r.content and b"def create_app" not in r.content


def test_unknown_route_is_json_404(client):
    assert_error(client.get("/nope"), 404)


# ----------------------------------------------------------------------------- bad input


def test_non_image_is_400(client):
    body = assert_error(post_image(client, b"hello, I am a text file\n" * 20, name="cat.jpg", ctype="image/jpeg"),
                        400, "not an image")
    assert "/" not in body["error"].split("(")[0]  # no server paths in the message


def test_empty_file_is_400(client):
    assert_error(post_image(client, b"", name="empty.png"), 400, "empty")


def test_truncated_jpeg_is_400(client, real_jpeg):
    assert_error(post_image(client, real_jpeg[: len(real_jpeg) // 2], name="cut.jpg", ctype="image/jpeg"),
                 400, "truncated")


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
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks():
        yield head
        for _ in range(40):
            yield b"\x00" * 10_000
        yield tail

    r = client.post("/api/search", content=chunks(),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413)


def test_lying_content_length_is_413(client):
    assert_error(client.post("/api/search", content=b"x",
                             headers={"content-type": "multipart/form-data; boundary=b",
                                      "content-length": str(10**9)}), 413)


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
    assert_error(client.post("/api/search", content=b"--x\r\ngarbage",
                             headers={"content-type": "multipart/form-data; boundary=x"}), 400)


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
                return await ac.post("/api/search", files={"image": ("q.png", blue_query, "image/png")},
                                     data={"k": "3"})

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


def test_json_error_bodies_are_valid_json(client):
    r = client.get("/gallery/abc")
    assert json.loads(r.content) == r.json()


def test_serve_builds_the_searcher_and_runs_uvicorn(monkeypatch, gallery_dir):
    import uvicorn

    import finegrain.retrieval.searcher as search_mod
    from finegrain.serve import app as app_mod

    made, ran = {}, {}

    def fake_searcher(run_path, index_dir=None, engine="auto"):
        made.update(run_path=run_path, index_dir=index_dir, engine=engine)
        return FakeSearcher(gallery_dir)

    monkeypatch.setattr(search_mod, "Searcher", fake_searcher)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    app_mod.serve("runs/x", index_dir=None, port=8123, max_upload_mb=0.5, max_image_mpixels=2.5,
                  allow_hosts=["search.lan"])
    assert made == {"run_path": "runs/x", "index_dir": None, "engine": "auto"}
    assert ran["host"] == "127.0.0.1" and ran["port"] == 8123
    assert ran["app"].state.max_upload_bytes == 2**19
    assert ran["app"].state.max_image_pixels == 2_500_000
    assert ran["app"].state.allowed_hosts == {"127.0.0.1", "localhost", "[::1]", "search.lan"}
    with TestClient(ran["app"], base_url="http://127.0.0.1:8123") as c:
        assert c.get("/api/info").json()["max_upload_bytes"] == 2**19


# ----------------------------------------------------------------------------- Host header (DNS rebinding)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "testserver.evil", "", "[::2]:8000", "local host"])
def test_unknown_host_is_refused(client, host):
    for url in ("/api/info", "/gallery/0", "/"):
        r = client.get(url, headers={"host": host})
        body = assert_error(r, 400, "host")
        assert "fake-run" not in r.text and not r.content.startswith(b"\x89PNG")
        assert r.headers["x-frame-options"] == "DENY"
    assert "evil" not in body["error"]  # the refused name is not echoed


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LocalHost:8000", "127.0.0.1", "127.0.0.1:1",
                                  "[::1]", "[::1]:8000"])
def test_local_hosts_are_accepted(client, host):
    r = client.get("/api/info", headers={"host": host})
    assert r.status_code == 200 and r.json()["run"] == "fake-run"


def test_test_client_host_is_not_allowed_by_default(searcher):
    with TestClient(create_app(searcher)) as c:  # Host: testserver
        assert_error(c.get("/api/health"), 400, "host")
    with TestClient(create_app(searcher), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/api/health").status_code == 200


def test_bound_address_and_allow_host_are_accepted(searcher):
    app = create_app(searcher, host="192.168.1.20", allow_hosts=["Search.Lan", "::1"])
    with TestClient(app, base_url="http://192.168.1.20:8000") as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/health", headers={"host": "search.lan:8000"}).status_code == 200
        assert_error(c.get("/api/health", headers={"host": "other.lan"}), 400)
    wildcard = create_app(searcher, host="0.0.0.0")
    with TestClient(wildcard, base_url="http://0.0.0.0:8000") as c:  # a wildcard bind is no host name
        assert_error(c.get("/api/health"), 400)
    with pytest.raises(FinegrainError, match="host name"):
        create_app(searcher, allow_hosts=["search.lan:8000"])


# ----------------------------------------------------------------------------- security headers


def assert_security_headers(r, docs: bool = False) -> None:
    h = r.headers
    csp = h["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp, r.url
    if not docs:
        assert "default-src 'self'" in csp and "script-src 'self';" in csp and "unsafe" not in csp
    assert h["x-content-type-options"] == "nosniff"
    assert h["x-frame-options"] == "DENY"
    assert h["referrer-policy"] == "no-referrer"
    for name in ("content-security-policy", "x-content-type-options", "x-frame-options"):
        assert len(h.get_list(name)) == 1, (name, r.url)


def test_every_response_has_the_security_headers(client, blue_query):
    for url in ("/", "/static/index.html", "/static/app.js", "/static/app.css", "/api/info", "/api/health",
                "/gallery/0", "/openapi.json", "/nope", "/static/nope.js", "/gallery/abc"):
        assert_security_headers(client.get(url))
    assert client.get("/static/index.html").headers["content-type"].startswith("text/html")
    assert_security_headers(client.get("/docs"), docs=True)
    assert_security_headers(post_image(client, blue_query, k=2))
    assert_security_headers(post_image(client, blue_query, k=0))  # 422
    assert_security_headers(post_image(client, b"x" * 300_000))  # 413
    assert_security_headers(client.get("/api/info", headers={"host": "evil.example"}))  # 400


def test_unexpected_error_is_json_500_with_headers(gallery_dir, blue_query):
    searcher = FakeSearcher(gallery_dir)

    def boom(image, k=10):
        raise RuntimeError(f"bug reading {gallery_dir}/00_0.png")

    searcher.search = boom
    with TestClient(make_app(searcher), raise_server_exceptions=False) as c:
        r = post_image(c, blue_query, k=2)
    assert_error(r, 500, "internal server error")
    assert str(gallery_dir) not in r.text
    assert_security_headers(r)


# ----------------------------------------------------------------------------- no server paths


def test_no_server_paths_in_info_or_search(gallery_dir, blue_query):
    searcher = FakeSearcher(gallery_dir)
    searcher.cfg.data = SimpleNamespace(root=str(gallery_dir / "datasets" / "birds-2024") + "/")
    with TestClient(make_app(searcher)) as c:
        info = c.get("/api/info")
        search = post_image(c, blue_query, k=5)
    assert info.json()["dataset"] == "birds-2024"
    for r in (info, search):
        assert r.status_code == 200
        assert str(gallery_dir) not in r.text and str(gallery_dir.parent) not in r.text
        assert ".png" not in r.text and ".jpg" not in r.text  # hits are gallery ids, not file names
    assert [h["url"] for h in search.json()["results"]] == [f"/gallery/{h['id']}" for h in search.json()["results"]]


def test_searcher_errors_do_not_show_server_paths(gallery_dir, blue_query):
    searcher = FakeSearcher(gallery_dir)

    def refuse(image, k=10):
        raise FinegrainError(f"the index in {gallery_dir}/index was built by another model (see {gallery_dir})")

    searcher.search = refuse
    with TestClient(make_app(searcher)) as c:
        body = assert_error(post_image(c, blue_query, k=2), 422, "another model")
    assert str(gallery_dir) not in body["error"] and "/" not in body["error"]
    assert "index" in body["error"]


# ----------------------------------------------------------------------------- bounded echo


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


def test_unknown_path_is_not_echoed_whole(client):
    body = assert_error(client.get("/" + "a" * 2000), 404)
    assert len(body["error"]) < 100


# ----------------------------------------------------------------------------- decode budget


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


# ----------------------------------------------------------------------------- serve options


@pytest.mark.parametrize("kwargs, option", [
    ({"port": 99999}, "--port"), ({"port": 0}, "--port"), ({"port": -1}, "--port"),
    ({"max_upload_mb": -5}, "--max-upload-mb"), ({"max_upload_mb": 0}, "--max-upload-mb"),
    ({"max_upload_mb": float("nan")}, "--max-upload-mb"), ({"max_upload_mb": float("inf")}, "--max-upload-mb"),
    ({"max_image_mpixels": 0}, "--max-image-mpixels"), ({"max_image_mpixels": -1}, "--max-image-mpixels"),
    ({"allow_hosts": ["http://evil/"]}, "host name"), ({"allow_hosts": ["a b"]}, "host name"),
])
def test_serve_validates_its_options_before_loading(monkeypatch, kwargs, option):
    import finegrain.retrieval.searcher as search_mod
    from finegrain.serve import app as app_mod

    def never(*a, **kw):
        raise AssertionError("the searcher must not be loaded for bad options")

    monkeypatch.setattr(search_mod, "Searcher", never)
    with pytest.raises(FinegrainError, match=re.escape(option)):
        app_mod.serve("runs/x", **kwargs)


def test_cli_reports_a_bad_port_in_one_line(tmp_path):
    import subprocess
    import sys

    for args, option in ((["--port", "99999"], "--port"), (["--max-upload-mb", "-5"], "--max-upload-mb")):
        r = subprocess.run([sys.executable, "-m", "finegrain", "serve", str(tmp_path), *args],
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 2, r.stderr
        assert option in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
