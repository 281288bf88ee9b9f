"""kill -9 in the middle of writes (real server and CLI processes): every acknowledged write is there
after a restart, nothing half-written is, and the count equals the ids listed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from finegrain.gallery.store import open_store

from .test_gallery_api import AUTH, TOKEN, png

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, token_file: Path, log: Path, store: str | None = None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    out = log.open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "finegrain",
            "serve",
            str(run),
            "--port",
            str(port),
            "--engine",
            "torch",
            "--write-token-file",
            str(token_file),
            *(["--store", store] if store else []),
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a loaded machine imports torch slowly
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"the server did not start in 300 s: {log.read_text()[-2000:]}")


def listed_ids(url: str) -> list[int]:
    ids: list[int] = []
    while True:
        page = httpx.get(f"{url}/api/gallery", params={"offset": len(ids), "limit": 1000}).json()
        ids += [e["id"] for e in page["entries"]]
        if len(ids) >= page["count"]:
            return ids


def stream(url: str, n: int, seed: int, acked: dict[int, bytes], fn: str) -> None:
    """Adds (or removes of the given ids) one per request until the server dies; record the acknowledged."""
    with httpx.Client(timeout=30) as c:
        for i in range(n):
            try:
                if fn == "add":
                    data = png(seed * 1000 + i)
                    r = c.post(
                        f"{url}/api/gallery",
                        files={"image": ("a.png", data, "image/png")},
                        data={"label": f"s{seed}"},
                        headers=AUTH,
                    )
                    if r.status_code == 200:
                        acked[r.json()["ids"][0]] = data
                else:
                    entry_id = list(acked)[i]
                    if c.delete(f"{url}/api/gallery/{entry_id}", headers=AUTH).status_code == 200:
                        acked[entry_id] = b"removed"
            except (httpx.HTTPError, IndexError):
                return


def kill_during(url: str, proc: subprocess.Popen, streams: list[tuple[int, dict, str]], after: int) -> None:
    threads = [threading.Thread(target=stream, args=(url, 10_000, seed, acked, fn)) for seed, acked, fn in streams]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while sum(len([v for v in a.values() if fn == "add" or v == b"removed"]) for _, a, fn in streams) < after:
        assert time.monotonic() < deadline, "the writes did not go through"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for t in threads:
        t.join()


def assert_stored_and_searchable(url: str, added: list[tuple[int, bytes]]) -> None:
    """Each (id, image bytes) is stored whole and is its own image's nearest neighbour."""
    for entry_id, data in added:
        assert httpx.get(f"{url}/gallery/{entry_id}").content == data
        found = httpx.post(f"{url}/api/search", files={"image": ("q.png", data, "image/png")}, data={"k": "1"})
        top = found.json()["results"][0]
        assert top["id"] == entry_id and top["same_image"]


def check_whole(url: str, run: Path) -> list[int]:
    ids = listed_ids(url)
    assert httpx.get(f"{url}/api/info").json()["gallery_size"] == len(ids) == len(set(ids))
    store = open_store(run / "gallery")  # beside the server: the embedded store is one SQLite file
    assert store.count() == len(ids) and len(store.vectors()[0]) == len(ids)
    store.close()
    return ids


def test_kill_9_during_adds_then_removes_loses_no_acknowledged_write(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    log = tmp_path / "serve.log"
    proc, url = start_server(run, token, log)
    first, second = {}, {}
    kill_during(url, proc, [(1, first, "add"), (2, second, "add")], after=12)
    proc, url = start_server(run, token, log)
    try:
        ids = set(check_whole(url, run))
        acked = {**first, **second}
        assert set(acked) <= ids
        assert_stored_and_searchable(url, list(acked.items())[:6])
        removing = dict(sorted(acked.items()))
        kill_during(url, proc, [(3, removing, "remove")], after=5)
        proc, url = start_server(run, token, log)
        left = set(check_whole(url, run))
        gone = {i for i, v in removing.items() if v == b"removed"}
        assert gone and not gone & left
        assert all(httpx.get(f"{url}/gallery/{i}").status_code == 404 for i in gone)
    finally:
        proc.kill()
        proc.wait()
    assert TOKEN not in log.read_text()


def test_kill_9_during_cli_gallery_add(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    folder = tmp_path / "images"
    for i in range(150):
        (folder / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"class{i % 3}" / f"{i:03d}.png").write_bytes(png(50_000 + i))
    indexed = 32  # the tiny run's test split, the store's first content
    cmd = [sys.executable, "-m", "finegrain", "gallery", "add", str(run), str(folder), "--engine", "torch"]
    env = {**os.environ, "FINEGRAIN_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    db = run / "gallery" / "gallery.sqlite"
    deadline = time.monotonic() + 180
    store = None
    while proc.poll() is None and time.monotonic() < deadline:
        store = store or (open_store(run / "gallery") if db.is_file() else None)
        if store is not None and store.count() >= indexed + 32:  # a batch is in: kill during the next ones
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the add finished before it could be killed: give it more images"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = open_store(run / "gallery")
    mid = store.count()
    assert indexed < mid < indexed + 150 and len(store.list(limit=1000)) == mid
    assert all(store.image(e.id) is not None for e in store.list(limit=1000))  # no entry without its image
    store.close()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)  # the rest; what is stored keeps its id
    store = open_store(run / "gallery")
    assert store.count() == indexed + 150
    assert {label: n for label, n in store.labels().items() if label.startswith("class")} == {
        "class0": 50,
        "class1": 50,
        "class2": 50,
    }


def test_kill_9_during_adds_on_milvus_lite_loses_no_acknowledged_add(trained_run, tmp_path):
    pytest.importorskip("pymilvus", reason="the milvus backend needs pymilvus: pip install 'finegrain[milvus]'")
    pytest.importorskip("milvus_lite", reason="Milvus Lite is not installed: pip install 'finegrain[milvus]'")
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    log = tmp_path / "serve.log"
    store = str(tmp_path / "gallery.db")
    proc, url = start_server(run, token, log, store)
    acked: dict[int, bytes] = {}
    kill_during(url, proc, [(4, acked, "add")], after=8)
    proc, url = start_server(run, token, log, store)  # the same Milvus Lite file, after the kill
    try:
        ids = listed_ids(url)
        assert httpx.get(f"{url}/api/info").json()["gallery_size"] == len(ids) == len(set(ids))
        assert set(acked) <= set(ids)
        assert_stored_and_searchable(url, list(acked.items())[:4])
    finally:
        proc.kill()
        proc.wait()
