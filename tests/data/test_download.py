"""Tiny ImageNet download against a local HTTP server; Stanford Cars instructions."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from finegrain.data import download
from finegrain.data.detect import open_collection
from finegrain.data.tiny_imagenet import write_tiny_imagenet
from finegrain.errors import DataError
from tests.data.conftest import make_samples

WNIDS = ["n01", "n02"]
WORDS = {"n01": "goldfish", "n02": "tabby cat"}


def _tiny_zip(tmp_path: Path) -> bytes:
    src = tmp_path / "zipsrc" / "tiny-imagenet-200"
    write_tiny_imagenet(src, WNIDS, WORDS, {"train": make_samples(2, 3, seed=1), "val": make_samples(2, 2, seed=2)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(src.parent.rglob("*")):
            zf.write(p, p.relative_to(src.parent).as_posix())
    return buf.getvalue()


class _Server:
    """A threaded HTTP server on 127.0.0.1 serving ``files`` (path → bytes).

    ``ranges``: honour ``Range: bytes=N-`` with 206 (else ignore it, answer 200).
    ``cut_after``: send only that many body bytes, then drop the connection.
    ``requests`` records ``(path, Range header)`` of every GET.
    """

    def __init__(self, files: dict[str, bytes], ranges: bool = True, cut_after: int | None = None):
        self.files, self.ranges, self.cut_after, self.requests = files, ranges, cut_after, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                outer.requests.append((self.path, self.headers.get("Range")))
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                rng = self.headers.get("Range")
                if outer.ranges and rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    body = data[start:]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_after is not None:
                    self.wfile.write(body[: outer.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def tiny_zip(tmp_path) -> tuple[bytes, str]:
    data = _tiny_zip(tmp_path)
    return data, hashlib.md5(data).hexdigest()


def test_defaults():
    assert download.TINY_IMAGENET_URL == "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    assert download.TINY_IMAGENET_MD5 == "90528d7ca1a48142e341f4ef8d21d0de"


def test_full_download_verify_extract(tmp_path, tiny_zip, monkeypatch):
    monkeypatch.setenv("FINEGRAIN_PROGRESS", "1")  # exercise the progress bar too
    data, md5 = tiny_zip
    dest = tmp_path / "data"
    with _Server({"/tiny-imagenet-200.zip": data}) as srv:
        root = download.download_tiny_imagenet(dest, url=srv.url("/tiny-imagenet-200.zip"), md5=md5)
        assert srv.requests == [("/tiny-imagenet-200.zip", None)]
    assert root == dest / "tiny-imagenet-200"
    assert (root / "wnids.txt").read_text().split() == WNIDS
    col = open_collection(root)
    assert col.format == "tiny_imagenet" and col.class_names == ["goldfish", "tabby cat"]
    assert len(col.splits["train"]) == 6 and len(col.splits["test"]) == 4
    assert (dest / "tiny-imagenet-200.zip").read_bytes() == data
    assert not (dest / "tiny-imagenet-200.zip.part").exists()
    assert not [p for p in dest.iterdir() if p.name.endswith(".extracting")]
    # already there: no network needed
    assert download.download_tiny_imagenet(dest, url="http://127.0.0.1:9/never.zip", md5=md5) == root


def test_resume_from_partial_file(tmp_path, tiny_zip):
    data, md5 = tiny_zip
    dest = tmp_path / "data"
    dest.mkdir()
    cut = len(data) // 3
    (dest / "tiny-imagenet-200.zip.part").write_bytes(data[:cut])
    with _Server({"/tiny-imagenet-200.zip": data}) as srv:
        root = download.download_tiny_imagenet(dest, url=srv.url("/tiny-imagenet-200.zip"), md5=md5)
        assert srv.requests == [("/tiny-imagenet-200.zip", f"bytes={cut}-")]
    assert (dest / "tiny-imagenet-200.zip").read_bytes() == data
    assert (root / "wnids.txt").is_file()


def test_interrupted_download_is_resumed(tmp_path, tiny_zip):
    data, md5 = tiny_zip
    dest = tmp_path / "data"
    url_path = "/tiny-imagenet-200.zip"
    with _Server({url_path: data}, cut_after=1000) as srv:
        with pytest.raises(DataError, match="resume"):
            download.download_tiny_imagenet(dest, url=srv.url(url_path), md5=md5)
    part = dest / "tiny-imagenet-200.zip.part"
    assert part.read_bytes() == data[:1000]
    with _Server({url_path: data}) as srv:
        root = download.download_tiny_imagenet(dest, url=srv.url(url_path), md5=md5)
        assert srv.requests == [(url_path, "bytes=1000-")]
    assert (dest / "tiny-imagenet-200.zip").read_bytes() == data and (root / "wnids.txt").is_file()


def test_restart_when_server_ignores_range(tmp_path, tiny_zip):
    data, md5 = tiny_zip
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "tiny-imagenet-200.zip.part").write_bytes(b"stale junk that is not the start of the zip")
    with _Server({"/tiny-imagenet-200.zip": data}, ranges=False) as srv:
        download.download_tiny_imagenet(dest, url=srv.url("/tiny-imagenet-200.zip"), md5=md5)
        assert srv.requests[0][1] is not None  # a resume was attempted, answered with 200
    assert (dest / "tiny-imagenet-200.zip").read_bytes() == data


def test_complete_part_file_answered_416(tmp_path, tiny_zip):
    data, md5 = tiny_zip
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "tiny-imagenet-200.zip.part").write_bytes(data)
    with _Server({"/tiny-imagenet-200.zip": data}) as srv:
        root = download.download_tiny_imagenet(dest, url=srv.url("/tiny-imagenet-200.zip"), md5=md5)
    assert (root / "wnids.txt").is_file()


def test_md5_mismatch_removes_part(tmp_path, tiny_zip):
    data, md5 = tiny_zip
    dest = tmp_path / "data"
    wrong = "0" * 32
    with _Server({"/tiny-imagenet-200.zip": data}) as srv:
        with pytest.raises(DataError) as err:
            download.download_tiny_imagenet(dest, url=srv.url("/tiny-imagenet-200.zip"), md5=wrong)
    msg = str(err.value)
    assert wrong in msg and md5 in msg
    assert not (dest / "tiny-imagenet-200.zip.part").exists()
    assert not (dest / "tiny-imagenet-200.zip").exists()
    assert not (dest / "tiny-imagenet-200").exists()


def test_manually_placed_zip_is_used(tmp_path, tiny_zip):
    data, md5 = tiny_zip
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "tiny-imagenet-200.zip").write_bytes(data)
    root = download.download_tiny_imagenet(dest, url="http://127.0.0.1:9/tiny-imagenet-200.zip", md5=md5)
    assert root == dest / "tiny-imagenet-200"


def test_unsafe_zip_member_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n01\n")
        zf.writestr("../evil.txt", "gotcha")
    dest = tmp_path / "data"
    with _Server({"/evil.zip": buf.getvalue()}) as srv:
        with pytest.raises(DataError, match="unsafe"):
            download.download_tiny_imagenet(dest, url=srv.url("/evil.zip"), md5=None)
    assert not (tmp_path / "evil.txt").exists()
    assert not (dest / "tiny-imagenet-200").exists()


def test_absolute_zip_member_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("/etc/evil.txt", "gotcha")
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "x.zip").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="unsafe"):
        download.download_tiny_imagenet(dest, url="http://127.0.0.1:9/x.zip", md5=None)


def test_not_a_zip(tmp_path):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "tiny-imagenet-200.zip").write_bytes(b"<html>mirror error page</html>")
    with pytest.raises(DataError, match="not a valid zip"):
        download.download_tiny_imagenet(dest, md5=None)


def test_http_error(tmp_path):
    with _Server({}) as srv:
        with pytest.raises(DataError, match="HTTP 404"):
            download.download_tiny_imagenet(tmp_path / "data", url=srv.url("/missing.zip"), md5=None)


def test_unreachable_url(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(DataError) as err:
        download.download_tiny_imagenet(tmp_path / "data", url=f"http://127.0.0.1:{port}/t.zip")
    msg = str(err.value)
    assert "no internet" in msg and "wnids.txt" in msg and "tiny-imagenet-200.zip" in msg


def test_stanford_cars_instructions():
    text = download.stanford_cars_instructions()
    for needle in (
        "jessicali9530/stanford-cars-dataset",
        "torchvision",
        "car_ims",
        "cars_annos.mat",
        "finegrain data check PATH",
        "no longer",
    ):
        assert needle in text
