"""Who the service answers and the headers on every response.

A request whose ``Host`` is not one of the server's own names (a DNS-rebinding page
names its own domain) is refused with 400; every response, errors and static files
included, carries :data:`SECURITY_HEADERS` (FastAPI's ``/docs`` pages get :data:`DOCS_CSP`).
Both are done by :class:`Guard`, the outermost ASGI layer of :class:`GuardedFastAPI`: Starlette's
``TrustedHostMiddleware`` parses the ``Host`` header and matches it (exact names, ``*.domain``
wildcards, no ``www.`` redirect); the Guard refuses in our JSON error form, with the security
headers, and refuses a request with two ``Host`` headers before Starlette would read the first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, MutableMapping
from typing import Any

from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from finegrain.errors import FinegrainError
from finegrain.serve.errors import echo, error_response

# The page's policy: everything from this origin, no inline code, never framed.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# FastAPI's /docs and /redoc pages are inline scripts + CDN assets; still never framed.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src 'self' https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com "
    "https://cdn.jsdelivr.net; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "[::]", "")
UNKNOWN_HOST = (
    "Unknown Host header: this server answers only to its own address (start it with --allow-host NAME to add a name)."
)
_HOST_RE = re.compile(r"(\*\.)?[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?|\[[0-9a-f:.]+\]")


def normalise_host(name: str) -> str:
    """A host name or IP address as a ``Host`` header names it (lower case, IPv6 in brackets), or a
    ``*.domain`` wildcard; :class:`FinegrainError` for anything else (a port, a URL, spaces)."""
    h = str(name).strip().lower()
    if h.count(":") >= 2 and not h.startswith("["):
        h = f"[{h}]"
    if not _HOST_RE.fullmatch(h):
        raise FinegrainError(
            f"not a host name or IP address: {echo(name, 40)} "
            "(give a name such as myhost.lan, *.myhost.lan or 192.168.1.5, without a port)"
        )
    return h


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` names the service answers to: localhost, 127.0.0.1, [::1], the bound
    address (unless it is a wildcard such as 0.0.0.0) and ``extra``."""
    hosts = set(LOCAL_HOSTS)
    if bind.strip().lower() not in WILDCARD_BINDS:
        hosts.add(normalise_host(bind))
    hosts.update(normalise_host(h) for h in extra)
    return frozenset(hosts)


def _raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
    """Our answer to a request for another host: a JSON 400, or a websocket closed (policy violation)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
    else:
        await error_response(400, UNKNOWN_HOST)(scope, receive, send)


class _Checked:
    """The ``send`` handed to Starlette's host check. Starlette passes it on to :meth:`Guard._admitted`
    for an allowed host, which unwraps it; anything Starlette sends itself is its refusal, which
    is answered with ours instead (and its own plain-text messages dropped)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self.refused = False

    async def __call__(self, message: Message) -> None:
        if not self.refused:
            self.refused = True
            await _refuse(self.scope, self.receive, self.send)


class Guard(TrustedHostMiddleware):
    """Outermost ASGI layer: Starlette's host check for the names in ``hosts`` (refused requests get
    our JSON 400; a request without exactly one ``Host`` header is refused first), and the security
    headers on every response (replacing any the route set), errors too."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str], docs_paths: frozenset[str]) -> None:
        super().__init__(self._admitted, allowed_hosts=sorted(hosts), www_redirect=False)
        self.inner = app
        self.docs_paths = docs_paths
        self.page_headers = _raw_headers(SECURITY_HEADERS)
        self.docs_headers = _raw_headers({**SECURITY_HEADERS, "Content-Security-Policy": DOCS_CSP})
        self.names = {k for k, _ in self.page_headers}

    async def _admitted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """What Starlette calls for an allowed host, with the :class:`_Checked` it was given."""
        await self.inner(scope, receive, send.send if isinstance(send, _Checked) else send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.inner(scope, receive, send)
            return
        extra = self.docs_headers if scope.get("path") in self.docs_paths else self.page_headers

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in self.names]
                message = {**message, "headers": kept + extra}
            await send(message)

        if sum(k == b"host" for k, _ in scope.get("headers", ())) != 1:  # Starlette would read the first
            await _refuse(scope, receive, send_with_headers)
            return
        await super().__call__(scope, receive, _Checked(scope, receive, send_with_headers))


class GuardedFastAPI(FastAPI):
    """FastAPI with :class:`Guard` outside even the 500 handler; ``state.allowed_hosts`` must be set."""

    def build_middleware_stack(self) -> Any:
        docs = frozenset(p for p in (self.docs_url, self.redoc_url, self.swagger_ui_oauth2_redirect_url) if p)
        return Guard(super().build_middleware_stack(), self.state.allowed_hosts, docs)
