"""The living gallery on the page, in headless Chromium: add an image with the write token, search
with it, and see it among the hits with its label and metadata (the token kept in memory only)."""

from __future__ import annotations

import shutil

import pytest

from finegrain.gallery.live import LiveGallery
from finegrain.serve.app import create_app
from finegrain.serve.gallery_routes import Tokens

from .live_server import running_server
from .test_browser import _save, _watch, browser, chromium_path  # noqa: F401 - fixtures
from .test_gallery_api import TOKEN, png

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def gallery_url(trained_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("browser-gallery") / "run"
    shutil.copytree(trained_run, run)
    with running_server(create_app(LiveGallery(run, engine="torch"), tokens=Tokens(write=TOKEN))) as url:
        yield url


def test_add_from_the_page_then_find_it(browser, gallery_url, tmp_path):  # noqa: F811 - a fixture
    image = tmp_path / "new-arrival.png"
    image.write_bytes(png(424242, (96, 72)))
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    seen = _watch(page, gallery_url)
    page.goto(gallery_url + "/")
    page.wait_for_selector("#gallery-add:not([hidden]) #gallery-submit", timeout=15000)
    page.set_input_files("#gallery-files", str(image))
    page.fill("#gallery-label", "page-added")
    page.fill("#gallery-metadata", '{"shop": "north"}')
    page.fill("#gallery-token", TOKEN)
    page.click("#gallery-submit")
    page.wait_for_function(
        "() => document.getElementById('gallery-status').textContent.startsWith('Added as #')", timeout=30000
    )
    assert page.inner_text("#gallery-size b") == "33"  # the header's count follows the add (32 indexed + 1)
    assert page.input_value("#gallery-token") == ""  # typed once, then only in the script's memory
    stored = page.evaluate("() => JSON.stringify(localStorage) + JSON.stringify(sessionStorage) + document.cookie")
    assert TOKEN not in stored

    page.set_input_files("#file", str(image))
    page.wait_for_selector("#results .result .result-meta", timeout=30000)
    first = page.locator("#results .result").first
    assert "page-added" in first.inner_text() and "shop: north" in first.inner_text()
    assert "same image" in first.inner_text()
    _save(page, "finegrain-gallery.png", tmp_path)
    assert not seen["errors"] and not seen["external"]
