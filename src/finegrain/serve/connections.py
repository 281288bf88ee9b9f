"""The HTTP connections uvicorn serves: how long a request's headers may take, how many
connections one client may hold open, and the responses uvicorn sends itself (a malformed
request's 400, a timeout's 408, a refused connection's 503), which never reach the application
and so get the security headers here.

uvicorn has no header timeout (its keep-alive timeout starts only after a first response) and
no limit per client, so 300 half-sent requests stayed open. :func:`guarded_protocol` makes an
h11 protocol class that adds both; pass it as ``uvicorn.run(..., http=...)``.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from finegrain.serve.security import SECURITY_HEADERS

HEADER_TIMEOUT = 10.0
"""Seconds a client has to send a request's headers, from connecting or from its previous response."""
MAX_CONNECTIONS_PER_CLIENT = 32
"""Connections one address may hold open at once; more are answered 503 and closed."""
BODY_TIMEOUT = 60.0
"""Seconds an upload's body may take to arrive (read by the search route)."""

_REASONS = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}


def raw_error(status: int, message: str) -> bytes:
    """A whole ``{"error": message}`` response that closes the connection, security headers included."""
    body = json.dumps({"error": message}).encode()
    headers = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "connection": "close",
        **SECURITY_HEADERS,
    }
    head = f"HTTP/1.1 {status} {_REASONS[status]}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


def guarded_protocol(
    header_timeout: float = HEADER_TIMEOUT, max_per_client: int = MAX_CONNECTIONS_PER_CLIENT
) -> type[H11Protocol]:
    """An h11 protocol class for uvicorn with a header timeout and a limit of open connections
    per client address (each class counts its own connections)."""
    open_per_client: Counter[str] = Counter()

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _counted: str | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            address = str(self.client[0]) if self.client else ""
            if open_per_client[address] >= max_per_client:
                self._refuse(503, f"too many open connections from this address (at most {max_per_client})")
                return
            open_per_client[address] += 1
            self._counted = address
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._counted is not None:
                open_per_client[self._counted] -= 1
                if open_per_client[self._counted] <= 0:
                    del open_per_client[self._counted]
                self._counted = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE and self._header_timer is None:
                self._arm()  # the next request of a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # its headers are in; the route bounds the body

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, msg)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._refuse(408, f"the request's headers did not arrive within {header_timeout:g} s")

        def _refuse(self, status: int, message: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(raw_error(status, message))
                self.transport.close()

    return GuardedH11Protocol
