"""What one gateway process accepts: connections, slow clients and requests in flight.

Three bounds, from the socket inwards, each with a documented default (`embedq serve --help`):

- **Connections** (`max_connections`): beyond it a new request gets 429 with `Retry-After` and the
  connection is closed. uvicorn's own `limit_concurrency` would answer a plain-text 503 instead.
- **Slow clients**: a connection must deliver a request's complete headers within `header_timeout_s`
  of its first byte (or of connecting), its body within `body_timeout_s` (408, then closed; see the
  gateway's body reader), and stays open idle between requests for `keep_alive_timeout_s`. uvicorn
  has the last one only, so `GuardedH11Protocol` adds the header timer to its h11 protocol.
- **Requests in flight** (`Admission`): `max_concurrency` requests wait on workers at once, each
  holding one Redis connection; up to `max_waiting` more queue for a slot; the next gets 429. The
  gateway's Redis pool is sized from `max_concurrency`, so it can never run out and answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("embedq.gateway")

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class HttpLimits:
    """Connection and slow-client bounds of one gateway (the `embedq serve` flags of the same names)."""

    max_connections: int = 2048
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    #: Whole seconds (uvicorn's `timeout_keep_alive`).
    keep_alive_timeout_s: int = 5
    #: h11's bound on a request line plus headers; more gets 400.
    max_header_bytes: int = 16 * 1024


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> bytes:
    """OpenAI's error shape as bytes; ASCII-escaped so that no text a client sent can break the encoding."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode("ascii")


class Overloaded(Exception):
    """Raised when a request finds every slot taken and the waiting line full (answered with 429)."""


class Admission:
    """At most `max_active` requests inside, `max_waiting` more waiting; the next is refused at once."""

    def __init__(self, max_active: int, max_waiting: int, max_wait_s: float = 60.0) -> None:
        self.max_active = max_active
        self.max_waiting = max_waiting
        #: A request that gets no slot within this long is refused too, rather than left to time out later.
        self.max_wait_s = max_wait_s
        self._slots = asyncio.Semaphore(max_active)
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the block; Overloaded when the line is full."""
        if not self._slots.locked():
            # A free slot is taken here and now: Semaphore.acquire does not yield while one is free. (Through
            # wait_for, Python 3.11 defers the acquire to a task of its own, so a burst read in one turn of the
            # event loop all saw the slot free and all queued: 12 requests, 0 refused, with 1 slot and 1 place.)
            await self._slots.acquire()
        else:
            if self.waiting >= self.max_waiting:
                raise Overloaded(
                    f"the gateway has {self.max_active} requests in flight and {self.waiting} waiting "
                    f"(limits --max-concurrency {self.max_active}, --max-waiting {self.max_waiting}); retry shortly"
                )
            self.waiting += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self.max_wait_s)
            except TimeoutError:
                raise Overloaded(
                    f"no free slot within {self.max_wait_s:g} s ({self.max_active} requests in flight); retry shortly"
                ) from None
            finally:
                self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()


def protocol_class(limits: HttpLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header timer and a connection limit that answers 429."""

    class Guarded(GuardedH11Protocol):
        header_timeout_s = limits.header_timeout_s
        max_connections = limits.max_connections

    return Guarded


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers and an OpenAI-shaped limit.

    uvicorn closes idle keep-alive connections but waits forever for a request that started and
    stalled (half a request line, headers one byte a minute): each such client holds a socket and
    memory. The timer starts when a connection opens, and again with the first byte after a finished
    response, and is never extended by further bytes, so trickling does not keep a connection alive.
    """

    header_timeout_s: float = 10.0
    max_connections: int = 2048

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._inner_app = self.app
        self.app = self._limited  # type: ignore[assignment]
        self.limit_concurrency = None  # ours answers 429 in OpenAI's shape; uvicorn's would be a plain 503

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is None or self.cycle.response_complete:
            self._arm()  # bytes of a request whose headers are not complete yet
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Bytes that are not HTTP (or headers over `max_header_bytes`): 400 in OpenAI's shape, then close."""
        body = error_body(msg, "invalid_request_error", "invalid_http")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        response = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
        with contextlib.suppress(h11.LocalProtocolError):  # h11 may refuse to answer at all; then just close
            for event in (response, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event) or b"")
        self.transport.close()

    def _arm(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served after all
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.warning(
            "gateway: closed the connection of %s: no complete request headers within %g s",
            client,
            self.header_timeout_s,
        )
        self.transport.close()

    async def _limited(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and len(self.connections) > self.max_connections:
            body = error_body(
                f"the gateway holds {len(self.connections)} connections (limit --max-connections "
                f"{self.max_connections}); retry shortly",
                "rate_limit_error",
                "too_many_connections",
            )
            headers = [
                (b"content-type", b"application/json"),
                (b"retry-after", str(RETRY_AFTER_S).encode()),
                (b"connection", b"close"),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self._inner_app(scope, receive, send)
