"""serve/security.py: the Host names the service answers to and the headers on every response,
first on a bare ASGI app, then through the whole service over a fake searcher."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi.testclient import TestClient

from finegrain.errors import FinegrainError
from finegrain.serve.app import create_app
from finegrain.serve.security import (
    DOCS_CSP,
    PAGE_CSP,
    SECURITY_HEADERS,
    Guard,
    allowed_hosts,
    normalise_host,
)

from .fakes import assert_error, assert_security_headers, post_image


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Search.Lan", "search.lan"),
        (" 192.168.1.5 ", "192.168.1.5"),
        ("::1", "[::1]"),
        ("[::1]", "[::1]"),
        ("fe80::1", "[fe80::1]"),
        ("a", "a"),
        ("my-host_1.local", "my-host_1.local"),
    ],
)
def test_normalise_host_accepts_names_and_addresses(name, expected):
    assert normalise_host(name) == expected


@pytest.mark.parametrize(
    "name", ["search.lan:8000", "http://evil/", "a b", "", "-lead", "trail.", "x" * 60 + " y", "*", "*.", "a.*.lan"]
)
def test_normalise_host_refuses_anything_else_quoting_little(name):
    with pytest.raises(FinegrainError, match="host name") as e:
        normalise_host(name)
    assert "x" * 41 not in str(e.value)


def test_allowed_hosts_are_local_names_the_bind_address_and_extras():
    assert allowed_hosts("127.0.0.1") == {"localhost", "127.0.0.1", "[::1]"}
    assert allowed_hosts("192.168.1.20", ["Search.Lan"]) == {
        "localhost",
        "127.0.0.1",
        "[::1]",
        "192.168.1.20",
        "search.lan",
    }
    for wildcard in ("0.0.0.0", "::", "[::]", " "):
        assert allowed_hosts(wildcard) == {"localhost", "127.0.0.1", "[::1]"}


# ----------------------------------------------------------------------------- the ASGI guard


async def _inner(scope: dict, receive: Any, send: Any) -> None:
    """A route that sets its own (weaker) security header and one of its own."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"x-frame-options", b"SAMEORIGIN"), (b"x-mine", b"1")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


def _call(app: Any, scope_type: str = "http", path: str = "/", hosts: tuple[bytes, ...] = (b"localhost:8000",)):
    sent: list[dict] = []
    scope = {
        "type": scope_type,
        "path": path,
        "headers": [(b"host", h) for h in hosts],
        "method": "GET",
        "query_string": b"",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
    }

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def _headers(sent: list[dict]) -> dict[str, list[str]]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    out: dict[str, list[str]] = {}
    for k, v in start["headers"]:
        out.setdefault(k.decode().lower(), []).append(v.decode())
    return out


GUARD = Guard(_inner, frozenset({"localhost"}), frozenset({"/docs"}))


def test_guard_puts_its_headers_in_place_of_the_routes():
    sent = _call(GUARD)
    h = _headers(sent)
    for name, value in SECURITY_HEADERS.items():
        assert h[name.lower()] == [value], name
    assert h["x-mine"] == ["1"]
    assert sent[-1]["body"] == b"ok"


def test_guard_gives_the_docs_pages_their_own_policy():
    h = _headers(_call(GUARD, path="/docs"))
    assert h["content-security-policy"] == [DOCS_CSP] and DOCS_CSP != PAGE_CSP
    assert h["x-frame-options"] == ["DENY"]


@pytest.mark.parametrize("hosts", [(b"evil.example",), (), (b"localhost", b"localhost"), (b"localhost.evil",)])
def test_guard_refuses_other_missing_or_repeated_hosts(hosts):
    sent = _call(GUARD, hosts=hosts)
    assert sent[0]["status"] == 400
    assert b"Unknown Host header" in sent[-1]["body"] and b"evil" not in sent[-1]["body"]
    assert _headers(sent)["x-frame-options"] == ["DENY"]


@pytest.mark.parametrize(
    "header, admitted",
    [
        (b"localhost", True),
        (b"LocalHost:8000", True),
        (b"[::1]:8000", True),
        (b"[::1]", True),
        (b"127.0.0.1:1", True),
        (b"", False),
        (b":8000", False),
        (b"a:b:c", False),
        (b"[::1", False),
        (b"[::2]:8000", False),
        (b"localhost.evil", False),
        (b"local host", False),
    ],
)
def test_guard_reads_the_host_header_port_dropped_and_in_any_case(header, admitted):
    guard = Guard(_inner, frozenset({"localhost", "127.0.0.1", "[::1]"}), frozenset())
    sent = _call(guard, hosts=(header,))
    assert sent[0]["status"] == (200 if admitted else 400), header


def test_guard_matches_wildcard_names_and_never_redirects_to_www():
    guard = Guard(_inner, frozenset({"*.search.lan", "www.photos.lan"}), frozenset())
    for host in (b"a.search.lan", b"b.a.search.lan:8000"):
        assert _call(guard, hosts=(host,))[0]["status"] == 200, host
    for host in (b"search.lan.evil", b"evilsearch.lan", b"photos.lan"):  # photos.lan: no www. redirect
        sent = _call(guard, hosts=(host,))
        assert sent[0]["status"] == 400 and b"Unknown Host header" in sent[-1]["body"], host


def test_guard_closes_a_websocket_for_another_host_and_passes_lifespan():
    assert _call(GUARD, scope_type="websocket", hosts=(b"evil.example",)) == [{"type": "websocket.close", "code": 1008}]
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(Guard(app, frozenset(), frozenset())({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


# ----------------------------------------------------------------------------- the service: Host header (DNS rebinding)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8000",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "testserver.evil",
        "",
        "[::2]:8000",
        "local host",
    ],
)
def test_unknown_host_is_refused(client, host):
    for url in ("/api/info", "/gallery/0", "/"):
        r = client.get(url, headers={"host": host})
        body = assert_error(r, 400, "host")
        assert "fake-run" not in r.text and not r.content.startswith(b"\x89PNG")
        assert r.headers["x-frame-options"] == "DENY"
        assert "evil" not in body["error"]  # the refused name is not echoed


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8000", "LocalHost:8000", "127.0.0.1", "127.0.0.1:1", "[::1]", "[::1]:8000"]
)
def test_local_hosts_are_accepted(client, host):
    r = client.get("/api/info", headers={"host": host})
    assert r.status_code == 200 and r.json()["run"] == "fake-run"


def test_test_client_host_is_not_allowed_by_default(searcher):
    with TestClient(create_app(searcher)) as c:  # Host: testserver
        assert_error(c.get("/api/health"), 400, "host")
    with TestClient(create_app(searcher), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/api/health").status_code == 200


def test_bound_address_and_allow_host_are_accepted(searcher):
    app = create_app(searcher, host="192.168.1.20", allow_hosts=["Search.Lan", "::1"])
    with TestClient(app, base_url="http://192.168.1.20:8000") as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/health", headers={"host": "search.lan:8000"}).status_code == 200
        assert_error(c.get("/api/health", headers={"host": "other.lan"}), 400)
    wildcard = create_app(searcher, host="0.0.0.0")
    with TestClient(wildcard, base_url="http://0.0.0.0:8000") as c:  # a wildcard bind is no host name
        assert_error(c.get("/api/health"), 400)
    with pytest.raises(FinegrainError, match="host name"):
        create_app(searcher, allow_hosts=["search.lan:8000"])
    everywhere = create_app(searcher, allow_hosts=["*.Search.Lan"])
    with TestClient(everywhere, base_url="http://box1.search.lan:8000") as c:
        assert c.get("/api/health").status_code == 200
        assert_error(c.get("/api/health", headers={"host": "search.lan.evil"}), 400, "host")


# ----------------------------------------------------------------------------- the service: security headers


def test_every_response_has_the_security_headers(client, blue_query):
    for url in (
        "/",
        "/static/index.html",
        "/static/app.js",
        "/static/app.css",
        "/api/info",
        "/api/health",
        "/gallery/0",
        "/openapi.json",
        "/nope",
        "/static/nope.js",
        "/gallery/abc",
    ):
        assert_security_headers(client.get(url))
    assert client.get("/static/index.html").headers["content-type"].startswith("text/html")
    assert_security_headers(client.get("/docs"), docs=True)
    assert_security_headers(post_image(client, blue_query, k=2))
    assert_security_headers(post_image(client, blue_query, k=0))  # 422
    assert_security_headers(post_image(client, b"x" * 300_000))  # 413
    assert_security_headers(client.get("/api/info", headers={"host": "evil.example"}))  # 400
