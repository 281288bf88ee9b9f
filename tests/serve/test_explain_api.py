"""``POST /api/explain`` on a real trained, exported and indexed run (ONNX Runtime), its refusals
(the same as ``/api/search``'s), and the page's "why" toggle in headless Chromium."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from finegrain.errors import FinegrainError
from finegrain.inference.explain import colorize, resize_map
from finegrain.runs import RunDir
from tests.conftest import tiny_config

from .fakes import make_app
from .live_server import running_server
from .test_browser import _upload_and_wait, browser, chromium_path  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    """A tiny classifier with a global-pooled timm backbone, exported to ONNX and indexed."""
    from finegrain.retrieval.gallery import build_index
    from finegrain.tasks import engine
    from finegrain.tasks.export import export_run

    root = tmp_path_factory.mktemp("explain-serve")
    cfg = tiny_config(
        root,
        name="why",
        model={"backbone": "timm:test_efficientnet"},
        data={"image_size": [64, 64]},
        train={"epochs": 1},
    )
    run, _ = engine.fit(cfg, runs_root=root)
    export_run(run.path)
    build_index(run.path, gallery="test")
    return run


@pytest.fixture(scope="module")
def client(run):
    from finegrain.retrieval.searcher import Searcher

    return TestClient(make_app(Searcher(run.path, engine="onnx"), max_upload_bytes=2**20))


def _query(run: RunDir) -> bytes:
    from finegrain.data.module import split_for
    from finegrain.inference.load import load_model

    path = split_for(load_model(run).cfg.data).test[0].path
    return Path(path).read_bytes()


def _cells(m: list) -> np.ndarray:
    """An answer's map: rows of cells in [0, 1], each map spanning its whole range (not a flat tile)."""
    a = np.asarray(m, dtype=np.float64)
    assert a.ndim == 2 and a.shape[0] >= 2 and a.shape[1] >= 2
    assert a.min() == 0.0 and a.max() == 1.0
    return a


def _without_query_maps(body: dict) -> dict:
    """``/api/explain``'s answer as an explained search's ``explanation``: no ``query_map`` per hit."""
    results = [{k: v for k, v in r.items() if k != "query_map"} for r in body["results"]]
    return {**{k: v for k, v in body.items() if k != "query_ms"}, "results": results}


def test_explain_gives_a_map_of_the_query_and_of_each_hit(client, run):
    query = _query(run)
    found = client.post("/api/search", files={"image": ("q.png", query)}, data={"k": "3"}).json()
    ids = [r["id"] for r in found["results"]]
    res = client.post(f"/api/explain?ids={','.join(map(str, ids))}", files={"image": ("q.png", query)})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["kind"] == "class" and body["explains"] == found["prediction"][0]["label"]
    assert body["legend"]["colormap"] == "viridis"
    assert [r["id"] for r in body["results"]] == ids
    grid = _cells(body["query"]["map"]).shape  # the model's grid: 2x2 at 64x64
    assert grid == (2, 2)  # the model's at 64x64
    assert body["query"]["size"] == list(Image.open(io.BytesIO(query)).size[::-1])  # the query's (height, width)
    assert len(body["legend"]["colors"]) == 17 and body["legend"]["colors"][-1] == "#fde725"
    searcher = client.app.state.searcher
    for r, hit in zip(body["results"], found["results"], strict=True):
        assert r["similarity"] == pytest.approx(hit["score"], abs=1e-3)  # the same model, the same cosine
        assert _cells(r["map"]).shape == grid and _cells(r["query_map"]).shape == grid
        assert r["size"] == list(Image.open(searcher.gallery_path(r["id"])).size[::-1])


@pytest.fixture
def passes(client, monkeypatch) -> list[bool]:
    """Each run of the ONNX model the client's searcher makes, as whether it copied maps out."""
    encoder = client.app.state.searcher.encoder
    calls: list[bool] = []
    real = encoder._run

    def counted(x: np.ndarray, maps: bool = False) -> dict[str, np.ndarray]:
        calls.append(maps)
        return real(x, maps)

    monkeypatch.setattr(encoder, "_run", counted)
    return calls


def test_an_explained_search_answers_the_hits_and_their_maps_from_one_pass(client, run, passes):
    query = {"image": ("q.png", _query(run))}
    sizes = len(client.app.state.searcher.encoder.sizes)
    plain = client.post("/api/search", files=query, data={"k": "3"}).json()
    assert "explanation" not in plain and passes == [False] * sizes  # a plain search copies no maps out
    passes.clear()
    res = client.post("/api/search", files=query, data={"k": "3", "explain": "1"})
    assert res.status_code == 200, res.text
    assert passes == [True] * sizes  # one pass of the query, its maps with its outputs
    body = res.json()
    strip = ("query_ms", "explanation")
    assert {k: v for k, v in body.items() if k not in strip} == {
        k: v for k, v in plain.items() if k not in ("query_ms", "results")
    } | {"results": body["results"]}
    assert [(r["id"], r["label"], r["rank"]) for r in body["results"]] == [
        (r["id"], r["label"], r["rank"]) for r in plain["results"]
    ]
    for got, want in zip(body["results"], plain["results"], strict=True):
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    assert all("query_map" not in r for r in body["explanation"]["results"])  # the page does not show them
    ids = ",".join(str(r["id"]) for r in plain["results"])
    separate = client.post(f"/api/explain?ids={ids}", files=query).json()
    assert body["explanation"] == _without_query_maps(separate)  # the same maps, cell for cell
    passes.clear()
    assert client.post("/api/search?explain=true", files=query).json()["explanation"]["kind"] == "class"
    assert passes == [True] * sizes  # the flag may come in the query string too


@pytest.mark.parametrize("value", ["yes", "2", "1,1"])
def test_a_bad_explain_flag_is_refused_in_one_line(client, run, value):
    res = client.post("/api/search", files={"image": ("q.png", _query(run))}, data={"explain": value.split(",")})
    assert res.status_code == 422 and "explain" in res.json()["error"] and "\n" not in res.json()["error"]


def test_the_search_documents_its_explain_field(client):
    schema = client.get("/openapi.json").json()["paths"]["/api/search"]["post"]
    fields = schema["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert "explanation" in fields["explain"]["description"] and "409" in schema["responses"]
    explain = client.get("/openapi.json").json()["paths"]["/api/explain"]["post"]
    assert [p["name"] for p in explain["parameters"]] == ["ids"]
    assert explain["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["image"]
    answer = explain["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
    assert set(answer["results"]["items"]["properties"]) == {"id", "similarity", "map", "size", "query_map"}
    assert {"400", "409", "413", "422"} <= set(explain["responses"])


def _search_error(client, files, query: str = "") -> tuple[int, dict]:
    res = client.post("/api/search" + query, files=files)
    return res.status_code, res.json()


@pytest.mark.parametrize(
    "files",
    [
        {"image": ("x.jpg", b"not an image at all" * 10)},
        {"image": ("x.png", b"")},
        {"other": ("x.png", b"123")},
    ],
)
def test_bad_uploads_get_the_same_answer_as_search(client, files):
    want = _search_error(client, files)
    res = client.post("/api/explain?ids=0", files=files)
    assert want[0] == 400 and (res.status_code, res.json()) == want
    assert _search_error(client, files, "?explain=1") == want


def test_bad_ids_are_refused_in_one_line(client, run):
    query = {"image": ("q.png", _query(run))}
    for ids, words in (
        ("0,x", "whole numbers"),
        ("99999", "no gallery image with id 99999"),
        (",".join(str(i) for i in range(60)), "at most 50"),
    ):
        res = client.post(f"/api/explain?ids={ids}", files=query)
        assert res.status_code == 422 and words in res.json()["error"] and "\n" not in res.json()["error"]


def test_info_says_the_service_explains_from_the_maps_its_index_stores(client):
    assert client.get("/api/info").json()["explain"] == {"available": True, "reason": None, "stored_maps": True}


def _old_export(run: RunDir, dest: Path) -> RunDir:
    """A copy of ``run`` whose ONNX export was made as before maps existed (no map outputs, no ``maps``
    entry in model.json)."""
    from finegrain.inference.export import export_onnx
    from finegrain.inference.load import file_sha256, load_model

    old = RunDir(shutil.copytree(run.path, dest))
    onnx = old.path / "export" / "model.onnx"
    onnx.write_bytes(export_onnx(load_model(old), (64, 64), maps=False))
    meta = json.loads((old.path / "export" / "model.json").read_text())
    meta["files"]["fp32"]["sha256"] = file_sha256(onnx)
    del meta["maps"]
    (old.path / "export" / "model.json").write_text(json.dumps(meta))
    return old


def test_a_run_exported_before_maps_is_told_to_re_export(run, tmp_path):
    from finegrain.retrieval.searcher import Searcher

    old = _old_export(run, tmp_path / "old")
    c = TestClient(make_app(Searcher(old.path, engine="onnx")))
    query = {"image": ("q.png", _query(run))}
    assert c.post("/api/search", files=query).status_code == 200  # searching still works
    info = c.get("/api/info").json()["explain"]
    assert info["available"] is False and "run `finegrain export RUN` again" in info["reason"]
    for files in (query, None):  # said before the upload is read: none is needed to learn it
        res = c.post("/api/explain?ids=0", files=files)
        assert res.status_code == 409 and "cannot explain" in res.json()["error"]
        assert "finegrain export" in res.json()["error"] and "\n" not in res.json()["error"]
    res = c.post("/api/search", files=query, data={"explain": "1"})
    assert res.status_code == 409 and res.json() == c.post("/api/explain?ids=0", files=query).json()


def test_a_model_without_maps_says_why_it_cannot_explain(trained_run, tmp_path):
    """A from-scratch CNN (dense layers after pooling) on the torch engine: no maps, and the reason."""
    from finegrain.retrieval.searcher import Searcher

    c = TestClient(make_app(Searcher(trained_run, engine="torch")))
    info = c.get("/api/info").json()["explain"]
    assert info["available"] is False and "computes more after pooling" in info["reason"]
    res = c.post("/api/explain?ids=0", files={"image": ("q.png", b"anything")})
    assert res.status_code == 409 and "computes more after pooling" in res.json()["error"]
    res = c.post("/api/search", files={"image": ("q.png", b"anything")}, data={"explain": "1"})
    assert res.status_code == 409 and "computes more after pooling" in res.json()["error"]
    from finegrain.retrieval.gallery import build_index

    with pytest.raises(FinegrainError, match="--maps: .*computes more after pooling"):  # asked for, refused
        build_index(trained_run, gallery="test", engine="torch", maps=True, out_dir=tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_an_index_built_without_maps_explains_by_running_the_hits_again(run, tmp_path):
    from finegrain.retrieval.explain_search import SearchExplainer
    from finegrain.retrieval.gallery import build_index
    from finegrain.retrieval.searcher import Searcher

    dest, info = build_index(run.path, gallery="test", engine="onnx", maps=False, out_dir=tmp_path / "index")
    assert info["maps"] is None and not (dest / "maps.npy").exists()
    searcher = Searcher(run.path, dest, engine="onnx")
    assert searcher.index.maps is None and searcher.info["explain"]["stored_maps"] is False
    query = Image.open(io.BytesIO(_query(run))).convert("RGB")
    hits, _, why = SearchExplainer(searcher).search(query, 3)
    assert [h.id for h in why.hits] == [h.id for h in hits] and all(np.ptp(h.map) > 0 for h in why.hits)


# --------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def server_url(run):
    from finegrain.retrieval.searcher import Searcher
    from finegrain.serve.app import create_app

    with running_server(create_app(Searcher(run.path, engine="onnx"))) as url:
        yield url


def _overlay_pixels(page, selector: str) -> np.ndarray:
    """The RGB pixels ``[h, w, 3]`` of the overlay image ``selector`` at its natural size, read in the page."""
    got = page.evaluate(
        """(sel) => { const i = document.querySelector(sel); const c = document.createElement("canvas");
        c.width = i.naturalWidth; c.height = i.naturalHeight; const x = c.getContext("2d"); x.drawImage(i, 0, 0);
        return {w: c.width, h: c.height, data: Array.from(x.getImageData(0, 0, c.width, c.height).data)}; }""",
        selector,
    )
    return np.asarray(got["data"], dtype=np.uint8).reshape(got["h"], got["w"], 4)[..., :3]


@pytest.mark.browser
def test_the_why_toggle_lays_maps_over_the_query_and_each_result(browser, server_url, run, tmp_path):  # noqa: F811
    query = tmp_path / "query.png"
    query.write_bytes(_query(run))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    asked: list[str] = []  # the search and explain requests the page makes, in order

    def note(r) -> None:
        path = r.url.split("?")[0].removeprefix(server_url)
        if path in ("/api/search", "/api/explain"):
            asked.append(path)

    page.on("request", note)
    page.goto(server_url + "/")
    toggle = page.locator("#explain-toggle")
    assert toggle.is_hidden()  # nothing to explain before a search
    with page.expect_response(lambda r: "/api/search" in r.url) as searched:
        _upload_and_wait(page, query, 8)
    assert "explanation" not in searched.value.json()  # a plain search asks for no maps
    assert page.locator(".explain-overlay").count() == 0 and asked == ["/api/search"]
    with page.expect_response(lambda r: "/api/explain" in r.url) as explained:
        toggle.click()
    page.wait_for_function("() => document.querySelectorAll('#results .explain-overlay').length === 8", timeout=20000)
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.explain-overlay')).every(i => i.complete && i.naturalWidth > 0)",
        timeout=10000,
    )
    assert page.locator(".dz-preview .explain-overlay").count() == 1
    why = explained.value.json()
    for sel, shown in [(".dz-preview .explain-overlay", why["query"])] + [
        (f'.result[data-id="{r["id"]}"] .explain-overlay', r) for r in why["results"][:3]
    ]:
        drawn = _overlay_pixels(page, sel)  # the page's drawing of the cells the server sent
        h, w = shown["size"]
        assert max(drawn.shape[:2]) == 96 and abs(drawn.shape[1] / drawn.shape[0] - w / h) < 0.05  # the image's shape
        want = colorize(resize_map(np.asarray(shown["map"], dtype=np.float32), drawn.shape[:2]))  # the CLI's colours
        diff = np.abs(drawn.astype(int) - want.astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 8, (sel, diff.mean(), diff.max())
    assert page.locator("#explain-legend").is_visible() and "Evidence for" in page.inner_text("#explain-legend")
    opacity = float(page.eval_on_selector("#results .explain-overlay", "n => getComputedStyle(n).opacity"))
    assert 0.2 < opacity < 0.9  # semi-transparent: the image shows through
    page.screenshot(path=str(tmp_path / "why.png"), full_page=True)
    assert asked == ["/api/search", "/api/explain"]  # on demand, for the hits shown
    # with "Why?" on, a search asks for its maps in the same request: no second one, no second pass
    with page.expect_response(lambda r: "/api/search" in r.url) as searched:
        _upload_and_wait(page, query, 8)
    assert len(searched.value.json()["explanation"]["results"]) == 8
    page.wait_for_function("() => document.querySelectorAll('#results .explain-overlay').length === 8", timeout=20000)
    assert page.locator(".dz-preview .explain-overlay").count() == 1
    page.wait_for_timeout(300)  # a second request would have been sent by now
    assert asked == ["/api/search", "/api/explain", "/api/search"]
    toggle.click()
    assert page.locator(".explain-overlay").count() == 0 and not page.locator("#explain-legend").is_visible()
    assert not errors
    page.close()


@pytest.mark.browser
def test_the_why_toggle_stays_hidden_for_a_model_without_maps(browser, run, tmp_path):  # noqa: F811
    from finegrain.retrieval.searcher import Searcher
    from finegrain.serve.app import create_app

    query = tmp_path / "query.png"
    query.write_bytes(_query(run))
    old = _old_export(run, tmp_path / "old")
    with running_server(create_app(Searcher(old.path, engine="onnx"))) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/")
        page.wait_for_function("() => document.querySelectorAll('#info .chip').length > 1", timeout=10000)
        _upload_and_wait(page, query, 8)
        page.wait_for_timeout(300)  # /api/info has long answered: the toggle would show by now
        assert page.locator("#explain-toggle").count() == 1 and page.locator("#explain-toggle").is_hidden()
        page.close()


def test_search_explain_draws_the_maps_on_the_contact_sheet(run, tmp_path):
    from typer.testing import CliRunner

    from finegrain.cli import app

    query = tmp_path / "query.png"
    query.write_bytes(_query(run))
    runner = CliRunner()
    plain, why = tmp_path / "plain.png", tmp_path / "why.png"
    args = ["search", str(run.path), str(query), "--k", "3", "--engine", "onnx", "--sheet"]
    assert runner.invoke(app, [*args, str(plain)]).exit_code == 0
    r = runner.invoke(app, [*args, str(why), "--explain"])
    assert r.exit_code == 0, r.output
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (plain, why))
    assert a.shape == b.shape and np.abs(a - b).mean() > 5  # the images carry their maps
    r = runner.invoke(app, ["search", str(run.path), str(query), "--explain"])  # the one-line error is main()'s
    assert r.exit_code != 0 and isinstance(r.exception, FinegrainError) and "give --sheet" in str(r.exception)


# --------------------------------------------------------------------------- a living gallery

LIVE_TOKEN = "explain-live-token-0123456789"
LIVE_AUTH = {"Authorization": f"Bearer {LIVE_TOKEN}"}


@pytest.fixture(scope="module")
def live(run, tmp_path_factory):
    """A living gallery over a copy of ``run``: its store starts as the run's index (the same ids),
    each image's bytes copied into it."""
    from finegrain.gallery.live import LiveGallery

    copy = tmp_path_factory.mktemp("explain-live") / "run"
    shutil.copytree(run.path, copy)
    return LiveGallery(copy, engine="onnx")


@pytest.fixture(scope="module")
def live_client(live):
    from finegrain.serve.gallery_routes import Tokens

    return TestClient(make_app(live, max_upload_bytes=2**20, tokens=Tokens(write=LIVE_TOKEN)))


def test_a_living_gallery_says_it_explains_without_stored_maps(live_client):
    info = live_client.get("/api/info").json()
    assert info["explain"] == {"available": True, "reason": None, "stored_maps": False}


def test_a_living_gallery_explains_its_hits_from_the_images_it_stores(live, run):
    """The store's copy of each image gives the map the index's file gives: the same numbers."""
    from finegrain.retrieval.explain_search import SearchExplainer
    from finegrain.retrieval.searcher import Searcher

    query = Image.open(io.BytesIO(_query(run))).convert("RGB")
    hits, top, why = SearchExplainer(live).search(query, 4)
    assert (hits, top) == live.search(query, 4)  # the explained search answers as the plain one
    ids = [h.id for h in hits]
    assert [h.id for h in why.hits] == ids
    static = SearchExplainer(Searcher(run.path, engine="onnx")).explain(query, ids)
    assert why.kind == static.kind and why.explains == static.explains
    np.testing.assert_allclose(why.query_map, static.query_map, atol=1e-4)
    for got, want in zip(why.hits, static.hits, strict=True):
        assert got.image_size == want.image_size and got.similarity == pytest.approx(want.similarity, abs=1e-4)
        np.testing.assert_allclose(got.map, want.map, atol=1e-3)
        np.testing.assert_allclose(got.query_map, want.query_map, atol=1e-3)


def test_a_living_gallery_s_explained_search_is_its_search_with_maps(live_client, run):
    query = {"image": ("q.png", _query(run))}
    plain = live_client.post("/api/search", files=query, data={"k": "3"}).json()
    res = live_client.post("/api/search", files=query, data={"k": "3", "explain": "1"})
    assert res.status_code == 200, res.text
    body = res.json()
    assert [(r["id"], r["label"], r["metadata"]) for r in body["results"]] == [
        (r["id"], r["label"], r["metadata"]) for r in plain["results"]
    ]
    assert body["prediction"] == plain["prediction"]
    assert [r["id"] for r in body["explanation"]["results"]] == [r["id"] for r in plain["results"]]
    for r in body["explanation"]["results"]:
        _cells(r["map"])
    ids = ",".join(str(r["id"]) for r in plain["results"])
    separate = live_client.post(f"/api/explain?ids={ids}", files=query).json()
    assert all(_cells(r["query_map"]).shape == _cells(r["map"]).shape for r in separate["results"])
    assert body["explanation"] == _without_query_maps(separate)  # the same maps, cell for cell


def test_a_living_gallery_explains_a_filtered_search_and_images_added_since(live_client, run):
    """An image added while serving is explained from its stored bytes, and the filter holds."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(_query(run))).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, "PNG")
    data = buf.getvalue()  # not in the gallery yet
    added = live_client.post(
        "/api/gallery", files=[("image", ("new.png", data, "image/png"))], data={"label": "only-new"}, headers=LIVE_AUTH
    )
    assert added.status_code == 200, added.text
    new_id = added.json()["ids"][0]
    query = {"image": ("q.png", data)}
    form = {"k": "3", "explain": "1", "filter": json.dumps({"label": "only-new"})}
    body = live_client.post("/api/search", files=query, data=form).json()
    assert [r["id"] for r in body["results"]] == [new_id]  # the filter is honoured by the explained search
    (hit,) = body["explanation"]["results"]
    assert hit["id"] == new_id and hit["similarity"] == pytest.approx(1.0, abs=1e-4)  # the query itself
    # the query's own map against itself, as /api/explain computes it for the stored copy
    assert live_client.post(f"/api/explain?ids={new_id}", files=query).json()["results"][0]["map"] == hit["map"]
    assert live_client.delete(f"/api/gallery/{new_id}", headers=LIVE_AUTH).status_code == 200
    res = live_client.post(f"/api/explain?ids={new_id}", files=query)  # removed since: a clear 422
    assert res.status_code == 422 and f"no gallery image with id {new_id}" in res.json()["error"]


def test_a_living_gallery_refuses_unknown_ids_in_one_line(live_client, run):
    query = {"image": ("q.png", _query(run))}
    for ids, words in (("0,x", "whole numbers"), ("123456789012345", "no gallery image with id 123456789012345")):
        res = live_client.post(f"/api/explain?ids={ids}", files=query)
        assert res.status_code == 422 and words in res.json()["error"] and "\n" not in res.json()["error"]


def test_a_living_gallery_s_explanations_need_its_read_token(live):
    from finegrain.serve.gallery_routes import Tokens

    c = TestClient(make_app(live, tokens=Tokens(read=LIVE_TOKEN)))
    query = {"image": ("q.png", b"anything")}
    assert c.post("/api/explain?ids=0", files=query).status_code == 401
    assert c.post("/api/search", files=query, data={"explain": "1"}).status_code == 401
    assert c.post("/api/explain?ids=0", files=query, headers=LIVE_AUTH).status_code == 400  # past the token


def test_search_explain_draws_a_living_gallery_s_maps_on_the_contact_sheet(live, run, tmp_path):
    from typer.testing import CliRunner

    from finegrain.cli import app

    query = tmp_path / "query.png"
    query.write_bytes(_query(run))
    plain, why = tmp_path / "plain.png", tmp_path / "why.png"
    args = ["search", str(live.run.path), str(query), "--k", "3", "--engine", "onnx", "--sheet"]  # its store
    assert CliRunner().invoke(app, [*args, str(plain)]).exit_code == 0
    r = CliRunner().invoke(app, [*args, str(why), "--explain"])
    assert r.exit_code == 0, r.output
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (plain, why))
    assert a.shape == b.shape and np.abs(a - b).mean() > 5  # the stored images carry their maps


@pytest.mark.browser
def test_the_why_toggle_explains_a_living_gallery_s_results(browser, live, run, tmp_path):  # noqa: F811
    from finegrain.serve.app import create_app

    query = tmp_path / "query.png"
    query.write_bytes(_query(run))
    with running_server(create_app(live)) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        _upload_and_wait(page, query, 8)
        toggle = page.locator("#explain-toggle")
        page.wait_for_function("() => !document.getElementById('explain-toggle').hidden", timeout=10000)
        toggle.click()  # /api/explain for the stored images shown
        page.wait_for_function(
            "() => document.querySelectorAll('#results .explain-overlay').length === 8", timeout=20000
        )
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.explain-overlay')).every(i => i.complete && i.naturalWidth)",
            timeout=10000,
        )
        assert page.locator(".dz-preview .explain-overlay").count() == 1
        with page.expect_response(lambda r: "/api/search" in r.url) as searched:  # "Why?" on: one request
            _upload_and_wait(page, query, 8)
        assert searched.value.status == 200 and len(searched.value.json()["explanation"]["results"]) == 8
        page.wait_for_function(
            "() => document.querySelectorAll('#results .explain-overlay').length === 8", timeout=20000
        )
        page.screenshot(path=str(tmp_path / "why-live.png"), full_page=True)
        assert not errors
        page.close()
