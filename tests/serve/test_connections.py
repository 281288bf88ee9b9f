"""A real uvicorn server on a socket: slow headers and slow bodies are answered (408) and closed,
one client cannot hold more than its share of connections (503), and uvicorn's own answers carry
the security headers and no ``server`` header."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from finegrain.serve.connections import guarded_protocol
from finegrain.serve.security import SECURITY_HEADERS

from .fakes import FakeSearcher, make_app

PER_CLIENT = 3


@pytest.fixture(scope="module")
def port(gallery_dir) -> Iterator[int]:
    app = make_app(FakeSearcher(gallery_dir), body_timeout=1.0)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="error",
        server_header=False,
        http=guarded_protocol(header_timeout=1.0, max_per_client=PER_CLIENT),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(10)


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(20)  # a hang guard: the server must answer and close long before
    return s


def answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of what the server sent before closing the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def assert_guarded(status: int, headers: dict[str, str], body: bytes, expected: int, says: str) -> None:
    assert status == expected
    assert "server" not in headers
    for name, value in SECURITY_HEADERS.items():
        assert headers[name.lower()] == value, name
    assert says in json.loads(body)["error"]


def test_headers_that_never_end_are_answered_408_and_closed(port):
    s = connect(port)
    s.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the headers never end
    assert_guarded(*answer(s), 408, "headers did not arrive")


def test_a_body_that_never_completes_is_answered_408(port):
    s = connect(port)
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\nabc'
    s.sendall(
        b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 1000\r\n\r\n" + part
    )
    assert_guarded(*answer(s), 408, "did not arrive")


def test_uvicorns_own_400_carries_the_security_headers(port):
    s = connect(port)
    s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    assert_guarded(*answer(s), 400, "Invalid HTTP request")


def test_one_client_holds_at_most_its_share_of_connections(port):
    held = [connect(port) for _ in range(PER_CLIENT)]
    try:
        assert_guarded(*answer(connect(port)), 503, "too many open connections")
    finally:
        for s in held:
            s.close()
    for _ in range(100):  # once the server has seen the closes, the client is welcome again
        s = connect(port)
        s.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        status, headers, body = answer(s)
        if status != 503:
            break
        time.sleep(0.05)
    assert status == 200 and json.loads(body) == {"status": "ok"} and "server" not in headers
