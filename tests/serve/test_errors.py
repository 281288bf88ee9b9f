"""serve/errors.py: bounded echoes, no server paths, and every failure answered as ``{"error": ...}``,
on a bare FastAPI app, then through the whole service over a fake searcher."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from finegrain.errors import FinegrainError
from finegrain.serve.errors import ApiError, echo, install_error_handlers, no_paths

from .fakes import (
    FakeSearcher,
    assert_error,
    assert_security_headers,
    make_app,
    post_image,
)


def test_echo_quotes_short_values_whole_and_cuts_long_ones():
    assert echo("abc") == "'abc'"
    assert echo(42) == "'42'"
    assert echo("x" * 12) == repr("x" * 12)
    assert echo("y" * 13) == repr("y" * 12 + "…")
    assert echo("z" * 5000, limit=3) == repr("zzz…")


@pytest.mark.parametrize(
    "message, expected",
    [
        ("cannot open /srv/data/birds/img 1.png", "cannot open img 1.png"),
        (
            "the index in /home/u/runs/r/index was built by another model",
            "the index in index was built by another model",
        ),
        ("see C:\\Users\\me\\run\\ for details", "see run for details"),
        ("(/tmp/secret/file.jpg)", "(file.jpg)"),
        ("ratio 3/4 and http://host/x are not paths", "ratio 3/4 and http://host/x are not paths"),
        ("root is / itself", "root is … itself"),
    ],
)
def test_no_paths_keeps_only_the_last_component(message, expected):
    assert no_paths(message) == expected


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/api")
    async def api() -> None:
        raise ApiError(418, "short and stout")

    @app.get("/number/{n}")
    async def number(n: int) -> dict[str, int]:
        return {"n": n}

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("secret /srv/path in a traceback")

    return app


@pytest.fixture(scope="module")
def client():
    with TestClient(_app(), raise_server_exceptions=False) as c:
        yield c


def test_api_error_is_its_status_and_message(client):
    r = client.get("/api")
    assert r.status_code == 418 and r.json() == {"error": "short and stout"}


def test_unknown_route_is_404_with_the_path_cut(client):
    r = client.get("/" + "a" * 500)
    assert r.status_code == 404 and set(r.json()) == {"error"}
    assert r.json()["error"].startswith("not found: '/aaa") and len(r.json()["error"]) < 90


def test_validation_error_is_422_naming_the_field(client):
    r = client.get("/number/abc")
    assert r.status_code == 422 and set(r.json()) == {"error"}
    assert r.json()["error"].startswith("n: ")


def test_a_bug_is_500_without_details(client, caplog):
    r = client.get("/bug")
    assert r.status_code == 500 and r.json() == {"error": "internal server error"}
    assert "/srv/path" not in r.text
    assert any("unexpected error on GET /bug" in rec.getMessage() for rec in caplog.records)


# ------------------------------------------------------------------ the service: JSON errors, no server paths


def test_json_error_bodies_are_valid_json(client):
    r = client.get("/gallery/abc")
    assert json.loads(r.content) == r.json()


def test_unknown_path_is_not_echoed_whole(client):
    body = assert_error(client.get("/" + "a" * 2000), 404)
    assert len(body["error"]) < 100


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


def test_no_server_paths_in_info_or_search(gallery_dir, blue_query):
    searcher = FakeSearcher(gallery_dir, dataset=str(gallery_dir / "datasets" / "birds-2024") + "/")
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
