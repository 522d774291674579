"""What wraps every gateway request: the API key, OpenAI-shaped errors, timing, and a last resort.

Every answer the gateway gives, its own routes' errors, FastAPI's 404 and 405, a body that never
arrives, a bug, is `{"error": {"message", "type", "param", "code"}}`, encoded as ASCII JSON so that
no text a client sent (a lone surrogate, say) can break the encoding of the answer itself.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.serve.limits import error_body

log = logging.getLogger("embedq.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths a monitoring system reads without the API key; everything else (the API, /docs, /openapi.json) needs it.
OPEN_PATHS = frozenset({"/health", "/metrics"})
#: Paths timed under their own label; anything else is "other", so that clients cannot grow the label set.
TIMED_PATHS = frozenset({"/v1/embeddings", "/v1/models", "/health", "/metrics"})


class ApiError(Exception):
    """An error to send back in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> Response:
        return Response(
            error_body(self.message, self.kind, self.code, self.param),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI and Starlette raise through OpenAI's error shape."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> Response:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (embedq serves POST /v1/embeddings)"
            code = "not_found"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            code = "method_not_allowed"
        else:
            message, code = str(error.detail), None
        return ApiError(error.status_code, message, code=code, headers=dict(error.headers or {})).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> Response:
        return ApiError(400, f"invalid request: {error.errors()[:3]}").response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> Response:
        # A bug, not the client's fault: one line in the log, an OpenAI-shaped 500 to the client.
        log.error("gateway: %s %s failed: %s: %s", request.method, request.url.path, type(error).__name__, error)
        return ApiError(500, "internal error in the gateway", kind="server_error", code="internal_error").response()


def authorised(scope: Scope, api_key: str) -> bool:
    """True when the request carries `Authorization: Bearer <api_key>`, compared in constant time."""
    expected = b"Bearer " + api_key.encode("utf-8")
    sent = next((value for name, value in scope.get("headers", []) if name == b"authorization"), b"")
    return hmac.compare_digest(sent, expected)


class Guard:
    """Outermost ASGI layer: the API key, request timing, and an OpenAI-shaped 500 for anything escaping."""

    def __init__(self, app: ASGIApp, api_key: str, latency: Histogram) -> None:
        self.app = app
        self.api_key = api_key
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        responded = False

        async def send_and_note(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = int(message["status"]), True
            await send(message)

        try:
            if self.api_key and scope["path"] not in OPEN_PATHS and not authorised(scope, self.api_key):
                await ApiError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    kind="authentication_error",
                    code="invalid_api_key",
                ).response()(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        except Exception as error:  # Starlette re-raises after its 500 handler answered; say it once
            if not responded:
                log.error("gateway: %s %s failed: %s: %s", scope["method"], scope["path"], type(error).__name__, error)
                body = error_body("internal error in the gateway", "server_error", "internal_error")
                await send_and_note(
                    {"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]}
                )
                await send_and_note({"type": "http.response.body", "body": body})
        finally:
            path = scope["path"] if scope["path"] in TIMED_PATHS else "other"
            self.latency.labels(path, str(status)).observe(time.perf_counter() - started)
