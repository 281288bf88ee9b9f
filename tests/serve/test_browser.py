"""The search page in headless Chromium: upload, results, prediction, lightbox, errors, phone width.

Needs Playwright for Python and a Chromium binary (Debian's ``chromium`` package is
used through ``executable_path``; ``playwright install`` is never needed). Skips
with the reason when either is missing. Screenshots go to the test's tmp_path and
to ``/tmp/finegrain-page.png`` (desktop), ``/tmp/finegrain-phone.png``,
``/tmp/finegrain-empty.png``,
``/tmp/finegrain-lightbox.png`` and ``/tmp/finegrain-error.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .fakes import FakeSearcher, draw_bird
from .live_server import running_server

pytestmark = pytest.mark.browser

SHOTS = Path(os.environ.get("FINEGRAIN_SCREENSHOTS", "/tmp"))


def find_chromium() -> str | None:
    env = os.environ.get("FINEGRAIN_CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium_path() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Playwright for Python is not available (pip install playwright): {e}")
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium binary found (apt-get install chromium, or set FINEGRAIN_CHROMIUM)")
    return path


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    from finegrain.serve.app import create_app

    searcher = FakeSearcher(tmp_path_factory.mktemp("browser-gallery"))
    with running_server(create_app(searcher, max_upload_bytes=2 * 2**20)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=chromium_path, args=["--no-sandbox", "--disable-gpu"])
        except Exception as e:  # noqa: BLE001 - a browser that cannot start is an environment problem
            pytest.skip(f"Chromium at {chromium_path} could not be started by Playwright: {e}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def query_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("queries")
    good = d / "indigo-bunting.jpg"
    draw_bird((45, 75, 195), 1, size=(640, 480)).save(good, quality=92)
    bad = d / "holiday-photo.jpg"
    bad.write_text("this is not really a picture\n" * 50)
    return {"good": good, "bad": bad}


def _watch(page, origin: str) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {"errors": [], "external": []}
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on(
        "request",
        lambda r: (
            seen["external"].append(r.url)
            if not (r.url.startswith(origin) or r.url.startswith(("blob:", "data:")))
            else None
        ),
    )
    return seen


def _upload_and_wait(page, path: Path, n: int) -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_function(
        "n => document.querySelectorAll('#results .result:not(.skeleton)').length === n", arg=n, timeout=15000
    )
    # every thumbnail decoded
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#results img')).every(i => i.complete && i.naturalWidth > 0)",
        timeout=15000,
    )


def _save(page, name: str, tmp_path: Path, full_page: bool = True) -> Path:
    out = tmp_path / name
    page.screenshot(path=str(out), full_page=full_page)
    try:
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, SHOTS / name)
    except OSError:
        pass
    return out


def test_desktop_search_flow(browser, server_url, query_files, tmp_path):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    page = ctx.new_page()
    seen = _watch(page, server_url)
    page.goto(server_url + "/")
    page.wait_for_selector("#info .chip-accent", timeout=10000)
    assert "tiny_cnn" in page.inner_text("#info")
    assert "24" in page.inner_text("#info")
    assert page.is_visible("#dropzone") and page.is_visible("#placeholder")
    _save(page, "finegrain-empty.png", tmp_path)

    _upload_and_wait(page, query_files["good"], 8)
    assert page.is_visible("#predict")
    assert page.inner_text("#top-label") == "Indigo Bunting"
    assert page.locator("#bars li").count() == 5
    cards = page.locator("#results .result")
    assert cards.count() == 8
    assert "Indigo Bunting" in cards.first.inner_text()
    assert page.is_hidden("#error") and page.is_hidden("#spinner")
    assert page.is_visible("#preview")
    shot = _save(page, "finegrain-page.png", tmp_path)
    assert shot.stat().st_size > 10_000

    # k selector re-runs the search
    page.select_option("#k", "4")
    page.wait_for_function(
        "() => document.querySelectorAll('#results .result:not(.skeleton)').length === 4", timeout=15000
    )

    # lightbox
    cards.nth(1).locator("button").click()
    page.wait_for_selector("#lightbox[open]", timeout=5000)
    page.wait_for_function(
        "() => { const i = document.getElementById('lb-img'); return i.complete && i.naturalWidth > 0; }"
    )
    assert page.inner_text("#lb-rank") == "#2"
    _save(page, "finegrain-lightbox.png", tmp_path, full_page=False)
    page.keyboard.press("ArrowRight")
    assert page.inner_text("#lb-rank") == "#3"
    page.keyboard.press("Escape")
    page.wait_for_selector("#lightbox:not([open])", state="attached", timeout=5000)

    # a bad file: a clear error banner, and the page keeps working
    page.set_input_files("#file", str(query_files["bad"]))
    page.wait_for_selector("#error:not([hidden])", timeout=15000)
    message = page.inner_text("#error")
    assert "not an image" in message.lower() and "holiday-photo.jpg" in message
    _save(page, "finegrain-error.png", tmp_path, full_page=False)
    _upload_and_wait(page, query_files["good"], 4)
    assert page.is_hidden("#error")

    assert not seen["external"], seen["external"]
    # the only console error is the browser's log line for the deliberate 400
    assert not [e for e in seen["errors"] if "status of 400" not in e], seen["errors"]
    ctx.close()


def test_phone_width(browser, server_url, query_files, tmp_path):
    ctx = browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    page = ctx.new_page()
    seen = _watch(page, server_url)
    page.goto(server_url + "/")
    page.wait_for_selector("#info .chip-accent", timeout=10000)
    _upload_and_wait(page, query_files["good"], 8)
    assert page.is_visible("#predict")
    # nothing wider than the screen
    wide = page.evaluate("""() => Array.from(document.querySelectorAll('body *'))
        .filter(e => e.getBoundingClientRect().right > 391)
        .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + ' ' + e.getAttribute('class'))""")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, wide
    # two result columns at phone width
    xs = page.eval_on_selector_all(
        "#results .result", "els => els.map(e => Math.round(e.getBoundingClientRect().left))"
    )
    assert len(set(xs)) == 2
    _save(page, "finegrain-phone.png", tmp_path)
    assert not seen["external"], seen["external"]
    ctx.close()
