"""``finegrain search`` on a run with a living gallery searches the store, answering as the server does."""

from __future__ import annotations

import json
import shutil

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.gallery.live import LiveGallery
from finegrain.serve.gallery_routes import Tokens
from tests.serve.fakes import make_app
from tests.serve.test_gallery_api import AUTH, TOKEN, png


def test_search_answers_from_the_store_as_the_server_does(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    live = LiveGallery(run, engine="torch")
    query = png(900)
    with TestClient(make_app(live, max_upload_bytes=200_000, tokens=Tokens(write=TOKEN))) as c:
        [new_id] = c.post(
            "/api/gallery", files={"image": ("new.png", query, "image/png")}, data={"label": "fresh"}, headers=AUTH
        ).json()["ids"]
        removed = c.get("/api/gallery", params={"limit": 1}).json()["entries"][0]["id"]
        assert c.delete(f"/api/gallery/{removed}", headers=AUTH).status_code == 200
        served = c.post("/api/search", files={"image": ("q.png", query, "image/png")}, data={"k": "5"}).json()
    size = live.gallery_size
    live.store.close()
    (tmp_path / "q.png").write_bytes(query)
    runner = CliRunner()
    r = runner.invoke(app, ["search", str(run), str(tmp_path / "q.png"), "--k", "5", "--json", "--engine", "torch"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["gallery_size"] == size
    assert [(h["id"], h["label"], h["same_image"]) for h in out["hits"]] == [
        (h["id"], h["label"], h["same_image"]) for h in served["results"]
    ]
    assert [round(h["score"], 4) for h in out["hits"]] == [round(h["score"], 4) for h in served["results"]]
    assert out["hits"][0]["id"] == new_id and out["hits"][0]["label"] == "fresh"  # only the store knows it
    assert removed not in [h["id"] for h in out["hits"]]
    # the index alone, on request: it knows neither the add nor the remove
    r = runner.invoke(
        app, ["search", str(run), str(tmp_path / "q.png"), "--json", "--engine", "torch", "--index", str(run / "index")]
    )
    assert r.exit_code == 0 and "fresh" not in [h["label"] for h in json.loads(r.stdout)["hits"]]
    sheet = tmp_path / "sheet.png"
    r = runner.invoke(app, ["search", str(run), str(tmp_path / "q.png"), "--k", "3", "--sheet", str(sheet)])
    assert r.exit_code == 0, r.output
    assert sheet.stat().st_size > 1000
