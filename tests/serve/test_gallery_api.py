"""The living gallery's API over a real tiny run: adds, removes, relabels, listings, filtered
searches, and the write token (every write refused without it, and changing nothing)."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from finegrain.gallery.live import LiveGallery
from finegrain.retrieval.searcher import SAME_IMAGE_MIN_COSINE
from finegrain.serve.gallery_routes import Tokens

from .fakes import make_app as create_app

TOKEN = "s3cret-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def live(trained_run, tmp_path_factory) -> LiveGallery:
    run = tmp_path_factory.mktemp("gallery-api") / "run"
    shutil.copytree(trained_run, run)
    return LiveGallery(run, engine="torch")


@pytest.fixture(scope="module")
def client(live):
    with TestClient(create_app(live, max_upload_bytes=200_000, tokens=Tokens(write=TOKEN))) as c:
        yield c


def add(client, *images: bytes, label: str = "", metadata: dict | None = None, headers=AUTH):
    files = [("image", (f"im{i}.png", data, "image/png")) for i, data in enumerate(images)]
    form = {"label": label, **({"metadata": json.dumps(metadata)} if metadata is not None else {})}
    return client.post("/api/gallery", files=files, data=form, headers=headers)


def test_the_index_is_the_store_s_first_content(live, trained_run):
    from finegrain.retrieval.index import GalleryIndex

    index = GalleryIndex.load(trained_run / "index")
    assert live.store.count() == index.n
    entry = live.store.get(0)
    assert entry is not None and entry.metadata["file"] == index.paths[0].rsplit("/", 1)[-1]
    assert live.store.image(0)[0] == Path(index.paths[0]).read_bytes()


def test_add_search_list_relabel_remove(client, live):
    before = live.store.count()
    r = add(client, png(1), png(2), png(1), label="mine", metadata={"sku": "A-1"})
    assert r.status_code == 200, r.text
    ids = r.json()["ids"]
    assert ids[0] == ids[2] != ids[1] and r.json()["size"] == before + 2  # same bytes: the same entry
    assert add(client, png(2)).json()["ids"] == [ids[1]]
    hit = client.post("/api/search", files={"image": ("q.png", png(1), "image/png")}, data={"k": "3"}).json()
    assert hit["results"][0]["id"] == ids[0] and hit["results"][0]["same_image"]
    assert hit["results"][0]["label"] == "mine" and hit["results"][0]["metadata"] == {"sku": "A-1"}
    only = client.post(
        "/api/search",
        files={"image": ("q.png", png(1), "image/png")},
        data={"filter": json.dumps({"metadata.sku": "A-1"}), "k": "5"},
    ).json()
    assert sorted(h["id"] for h in only["results"]) == sorted(ids[:2])
    listing = client.get("/api/gallery", params={"label": "mine"}).json()
    assert [e["id"] for e in listing["entries"]] == sorted(ids[:2]) and listing["count"] == 2
    assert client.get(f"/gallery/{ids[0]}").content == png(1)
    r = client.patch(f"/api/gallery/{ids[1]}", json={"label": "theirs", "metadata": {"sku": "B"}}, headers=AUTH)
    assert r.status_code == 200 and client.get(f"/api/gallery/{ids[1]}/meta").json()["label"] == "theirs"
    assert client.delete(f"/api/gallery/{ids[0]}", headers=AUTH).json()["size"] == before + 1
    assert client.get(f"/gallery/{ids[0]}").status_code == 404
    assert client.get(f"/api/gallery/{ids[0]}/meta").status_code == 404
    assert client.delete(f"/api/gallery/{ids[0]}", headers=AUTH).status_code == 404
    assert client.get("/api/info").json()["gallery_size"] == before + 1


def drawing() -> Image.Image:
    """A smooth picture (shapes on a plain ground): a JPEG of it stays close to it."""
    im = Image.new("RGB", (64, 48), (40, 90, 160))
    pen = ImageDraw.Draw(im)
    pen.ellipse((10, 8, 40, 40), fill=(220, 180, 30))
    pen.rectangle((40, 20, 60, 44), fill=(20, 160, 60))
    return im


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_the_same_pixels_in_another_file_are_the_same_image_and_a_near_copy_is_not(client, live):
    """The pixels decide, not the score: a copy re-encoded (BMP for the PNG stored) is marked even
    when its score is just under 1 (another engine or precision), a JPEG of it scoring as close is not."""
    im = drawing()
    [stored] = add(client, encoded(im, "PNG"), label="drawn").json()["ids"]
    copy = Image.open(io.BytesIO(encoded(im, "BMP")))
    found = client.post("/api/search", files={"image": ("q.bmp", encoded(im, "BMP"), "image/bmp")}, data={"k": "2"})
    top = found.json()["results"][0]
    assert top["id"] == stored and top["same_image"]
    emb, probs = live.encode(copy)
    nudged = emb + np.random.default_rng(0).normal(size=emb.shape) * 0.04 * np.linalg.norm(emb) / emb.size**0.5
    hits, _ = live.search(copy, k=2, encoded=(nudged.astype(np.float32), probs))
    assert hits[0].id == stored and SAME_IMAGE_MIN_COSINE <= hits[0].score < 0.9999 and hits[0].same_image
    jpeg = encoded(im, "JPEG", quality=95)
    hits, _ = live.search(Image.open(io.BytesIO(jpeg)), k=2)
    assert hits[0].id == stored and hits[0].score >= SAME_IMAGE_MIN_COSINE and not hits[0].same_image


def test_adds_keep_the_upload_limits_and_decode_guard(client, live, bomb_png):
    before = live.store.count()
    assert add(client, bomb_png).status_code == 400
    assert add(client, png(5), b"not an image").status_code == 400  # all or nothing
    assert add(client, png(6, (400, 400)) + b"\0" * 300_000).status_code == 413
    assert add(client, png(7), metadata=["a"]).status_code == 422
    assert live.store.count() == before


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789abcdef"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ],
)
def test_every_write_needs_the_token_and_changes_nothing(client, live, headers):
    [entry_id] = add(client, png(11), label="kept").json()["ids"]
    before = (live.store.count(), live.store.get(entry_id))
    answers = [
        add(client, png(12), headers=headers),
        client.delete(f"/api/gallery/{entry_id}", headers=headers),
        client.patch(f"/api/gallery/{entry_id}", json={"label": "x"}, headers=headers),
    ]
    assert [r.status_code for r in answers] == [401, 401, 401]
    assert all("error" in r.json() and TOKEN not in r.text for r in answers)
    assert (live.store.count(), live.store.get(entry_id)) == before


def test_without_a_token_the_write_routes_are_absent_and_reads_open(live):
    with TestClient(create_app(live)) as c:
        assert add(c, png(13), headers=AUTH).status_code == 404
        assert c.delete("/api/gallery/0", headers=AUTH).status_code == 404
        assert c.get("/api/info").json()["gallery_writes"] is False
        assert c.get("/api/gallery").status_code == 200


def test_a_read_token_closes_reads(live):
    reader = "reader-token-0123456789abcdef"
    with TestClient(create_app(live, tokens=Tokens(write=TOKEN, read=reader))) as c:
        assert c.get("/api/gallery").status_code == 401 and c.get("/gallery/1").status_code == 401
        assert c.get("/api/gallery", headers={"Authorization": f"Bearer {reader}"}).status_code == 200
        assert c.get("/api/info", headers=AUTH).status_code == 200


def test_the_token_is_never_in_info_or_logs(client, caplog):
    with caplog.at_level(logging.DEBUG):
        add(client, png(14), headers=AUTH)
        add(client, png(15), headers={"Authorization": f"Bearer {TOKEN}x"})
        info = client.get("/api/info").text
    assert TOKEN not in info and TOKEN not in caplog.text and "Tokens(write=set" in repr(Tokens(write=TOKEN))


def test_a_filter_made_to_break_out_is_refused_or_literal(client):
    query = {"image": ("q.png", png(1), "image/png")}
    for bad in ['{"label": "x\\" || true"}', '{"metadata.a\\"] or true or [\\"": 1}', '{"metadata.n": [1]}']:
        r = client.post("/api/search", files=query, data={"filter": bad})
        assert r.status_code == 422 or r.json()["results"] == [], bad


def test_the_gallery_routes_answer_a_body_that_never_completes_408(live):
    """The living gallery's own search and add routes keep the server's body timeout."""
    from .live_server import running_server
    from .test_connections import answer, connect

    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\nabc'
    app = create_app(live, body_timeout=1.0, tokens=Tokens(write=TOKEN))
    with running_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        for route, extra in (("/api/search", b""), ("/api/gallery", f"Authorization: Bearer {TOKEN}\r\n".encode())):
            s = connect(port)
            s.sendall(
                b"POST "
                + route.encode()
                + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                + extra
                + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                + part
            )
            status, _, body = answer(s)
            assert status == 408 and "did not arrive" in json.loads(body)["error"], (route, body)


def test_the_live_search_route_is_the_one_documented_with_its_filter(client):
    body = client.get("/openapi.json").json()["paths"]["/api/search"]["post"]["requestBody"]
    assert {"image", "k", "filter"} <= set(body["content"]["multipart/form-data"]["schema"]["properties"])


def test_a_living_gallery_over_a_model_without_maps_says_why_it_cannot_explain(client):
    """The run's CNN computes more after pooling: its info says so, an explained search and
    ``/api/explain`` give the same clear 409, and a plain search still answers."""
    info = client.get("/api/info").json()["explain"]
    assert info["available"] is False and info["stored_maps"] is False
    query = {"image": ("q.png", png(3), "image/png")}
    res = client.post("/api/search", files=query, data={"explain": "1"})
    assert res.status_code == 409 and "computes more after pooling" in res.json()["error"]
    assert client.post("/api/explain?ids=0", files=query).json() == res.json()
    assert "explanation" not in client.post("/api/search", files=query, data={"explain": "0"}).json()
