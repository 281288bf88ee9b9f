"""``finegrain serve``: options checked before anything loads, then the searcher and uvicorn."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from finegrain.errors import FinegrainError

from .fakes import FakeSearcher


def test_serve_builds_the_searcher_and_runs_uvicorn(monkeypatch, gallery_dir):
    import uvicorn

    import finegrain.gallery.live as live_mod
    from finegrain.serve import app as app_mod

    made, ran, shared = {}, {}, []

    def fake_searcher(run_path, store=None, index_dir=None, engine="auto"):
        made.update(run_path=run_path, index_dir=index_dir, engine=engine)
        searcher = FakeSearcher(gallery_dir)
        searcher.share_cores = lambda n: shared.append(n) or 1  # what a Searcher does before serving
        return searcher

    monkeypatch.setattr(live_mod, "LiveGallery", fake_searcher)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    app_mod.serve(
        "runs/x",
        index_dir=None,
        port=8123,
        max_upload_mb=0.5,
        max_image_mpixels=2.5,
        allow_hosts=["search.lan"],
        max_concurrency=3,
    )
    assert made == {"run_path": "runs/x", "index_dir": None, "engine": "auto"}
    assert shared == [3]  # the cores are shared out among the searches the app runs at once
    assert ran["host"] == "127.0.0.1" and ran["port"] == 8123
    assert (
        ran["server_header"] is False and ran["http"].__name__ == "GuardedH11Protocol"
    )  # tests/serve/test_connections.py
    assert ran["app"].state.max_upload_bytes == 500_000  # --max-upload-mb 0.5: decimal megabytes
    assert ran["app"].state.max_image_pixels == 2_500_000
    assert ran["app"].state.allowed_hosts == {"127.0.0.1", "localhost", "[::1]", "search.lan"}
    with TestClient(ran["app"], base_url="http://127.0.0.1:8123") as c:
        assert c.get("/api/info").json()["max_upload_bytes"] == 500_000


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"port": 99999}, "--port"),
        ({"port": 0}, "--port"),
        ({"port": -1}, "--port"),
        ({"max_upload_mb": -5}, "--max-upload-mb"),
        ({"max_upload_mb": 0}, "--max-upload-mb"),
        ({"max_upload_mb": float("nan")}, "--max-upload-mb"),
        ({"max_upload_mb": float("inf")}, "--max-upload-mb"),
        ({"max_image_mpixels": 0}, "--max-image-mpixels"),
        ({"max_image_mpixels": -1}, "--max-image-mpixels"),
        ({"max_concurrency": 0}, "--max-concurrency"),
        ({"max_concurrency": 1.5}, "--max-concurrency"),
        ({"allow_hosts": ["http://evil/"]}, "host name"),
        ({"allow_hosts": ["a b"]}, "host name"),
    ],
)
def test_serve_validates_its_options_before_loading(monkeypatch, kwargs, option):
    import finegrain.gallery.live as live_mod
    from finegrain.serve import app as app_mod

    def never(*a, **kw):
        raise AssertionError("the searcher must not be loaded for bad options")

    monkeypatch.setattr(live_mod, "LiveGallery", never)
    with pytest.raises(FinegrainError, match=re.escape(option)):
        app_mod.serve("runs/x", **kwargs)


@pytest.mark.slow
def test_cli_reports_a_bad_port_in_one_line(tmp_path):
    import subprocess
    import sys

    for args, option in ((["--port", "99999"], "--port"), (["--max-upload-mb", "-5"], "--max-upload-mb")):
        r = subprocess.run(
            [sys.executable, "-m", "finegrain", "serve", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert r.returncode == 2, r.stderr
        assert option in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
