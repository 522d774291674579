"""The HTTP gateway: OpenAI's embeddings API in front of the worker fleet (`embedq serve`).

    POST /v1/embeddings   {"input": "text" | ["text", ...], "model": ..., "encoding_format": "float" | "base64"}
    GET  /v1/models       the model the workers serve
    GET  /health          200 when the broker answers and at least one worker replies to a ping
    GET  /metrics         Prometheus: embedq's fleet counters and the gateway's own request timings

Requests go to the `interactive` lane through `AsyncEmbedClient`, so a view never blocks the event
loop. Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so that the
official `openai` package raises its usual exceptions with embedq's message in them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Histogram

from producer.async_client import AsyncEmbedClient
from producer.metrics import fleet_registry, render
from workers.config import Settings
from workers.errors import InvalidRecords, JobFailed, QueueFull, RequestTimeout
from workers.keys import connect, redact

MIB = 1 << 20


@dataclass(frozen=True)
class GatewayOptions:
    """Limits and switches of one gateway process."""

    #: Items in one request's `input` (OpenAI allows 2048).
    max_inputs: int = 2048
    max_body_bytes: int = 8 * MIB
    #: Messages waiting in the interactive queue beyond which requests get 429.
    max_queue: int = 1000
    timeout_s: float = 60.0
    cache: bool = True
    cache_ttl_s: int = 24 * 3600
    #: How long /health waits for a worker to answer a ping.
    ping_timeout_s: float = 1.0


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

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def model_ids(client: AsyncEmbedClient) -> list[str]:
    """Names a request's `model` may use: the served model's name, and its path when it is a folder."""
    names = [client.model.name]
    if client.model.path and client.model.path != client.model.name:
        names.append(client.model.path)
    return names


def parse_input(raw: Any, max_inputs: int) -> list[str] | str:
    """`input` as the client needs it; token arrays and wrong shapes are refused with a clear 400."""
    if isinstance(raw, list):
        if len(raw) > max_inputs:
            raise ApiError(
                413,
                f"'input' has {len(raw)} items; send at most {max_inputs} per request",
                param="input",
                code="too_many_inputs",
            )
        if (
            raw
            and all(isinstance(item, (int, list)) for item in raw)
            and not any(isinstance(item, str) for item in raw)
        ):
            raise ApiError(
                400,
                "'input' is token ids; embedq tokenizes itself: send the texts as strings "
                "(LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False); "
                "LlamaIndex: OpenAILikeEmbedding, which sends text, rather than OpenAIEmbedding)",
                param="input",
                code="token_arrays_unsupported",
            )
        if not raw:
            raise ApiError(400, "'input' is an empty list; send at least one text", param="input")
        return raw
    if raw is None:
        raise ApiError(400, "'input' is required: a string or a list of strings", param="input")
    # Strings pass; anything else fails the client's validation, which names its reason.
    return raw  # type: ignore[no-any-return]


def encode_rows(matrix: np.ndarray, encoding_format: str) -> list[Any]:
    if encoding_format == "base64":
        return [base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii") for row in matrix]
    return matrix.tolist()  # type: ignore[no-any-return]


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The JSON body, refused with 413 past `limit` bytes (counted as it arrives, not trusted from headers)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes", code="request_too_large"
        )
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except ValueError as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def create_app(settings: Settings, options: GatewayOptions | None = None) -> FastAPI:
    """The gateway for the workers behind `settings.broker_url`."""
    opts = options or GatewayOptions()
    client = AsyncEmbedClient(settings=settings, cache=opts.cache, cache_ttl_s=opts.cache_ttl_s)
    sync_redis = connect(settings.broker_url, check=False)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()
        sync_redis.close()

    app = FastAPI(title="embedq gateway", version="0.1.0", lifespan=lifespan)
    registry = fleet_registry(sync_redis, client.keys)
    latency = Histogram(
        "embedq_gateway_request_seconds",
        "Gateway request latency",
        ["path", "status"],
        registry=registry,
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2.5, 5, 10, 30),
    )
    app.state.client = client

    @app.middleware("http")
    async def errors_and_timing(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        try:
            if settings.api_key and request.url.path.startswith("/v1/"):
                expected = f"Bearer {settings.api_key}"
                if request.headers.get("authorization", "") != expected:
                    raise ApiError(
                        401,
                        "missing or wrong API key: send 'Authorization: Bearer <key>'",
                        kind="authentication_error",
                        code="invalid_api_key",
                    )
            response: Response = await call_next(request)
        except ApiError as error:
            response = error.response()
        path = request.url.path if request.url.path in ("/v1/embeddings", "/v1/models", "/health") else "other"
        latency.labels(path, str(response.status_code)).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = await read_json(request, opts.max_body_bytes)
        texts = parse_input(body.get("input"), opts.max_inputs)
        model = body.get("model")
        if model is not None and model not in model_ids(client):
            raise ApiError(
                404,
                f"model {model!r} is not served here; use {client.model.name!r} (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        encoding_format = body.get("encoding_format") or "float"
        if encoding_format not in ("float", "base64"):
            raise ApiError(400, f"'encoding_format' {encoding_format!r}: use float or base64", param="encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None and client.dim and dimensions != client.dim:
            raise ApiError(
                400,
                f"'dimensions' {dimensions}: {client.model.name} only makes {client.dim}-dimensional "
                "vectors; omit 'dimensions' or pass that number",
                param="dimensions",
                code="dimensions_unsupported",
            )
        depth = await client.queue_depth()
        if depth >= opts.max_queue:
            raise ApiError(
                429,
                str(QueueFull(f"the interactive queue holds {depth} requests (limit {opts.max_queue}); retry shortly")),
                kind="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        try:
            matrix, tokens = await client.embed_with_usage(texts, timeout=opts.timeout_s)
        except InvalidRecords as error:
            raise ApiError(400, str(error), param="input", code="invalid_input") from None
        except RequestTimeout as error:
            raise ApiError(504, str(error), kind="server_error", code="timeout") from None
        except JobFailed as error:
            raise ApiError(500, str(error), kind="server_error", code="embedding_failed") from None
        except (redis.exceptions.RedisError, OSError) as error:
            raise ApiError(
                503, f"broker unreachable: {error}", kind="server_error", code="broker_unavailable"
            ) from None
        if dimensions is not None and dimensions != matrix.shape[1]:
            raise ApiError(
                400,
                f"'dimensions' {dimensions}: this model makes {matrix.shape[1]}-dimensional vectors",
                param="dimensions",
                code="dimensions_unsupported",
            )
        rows = encode_rows(matrix, encoding_format)
        return JSONResponse(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
                "model": client.model.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        entry = {"id": client.model.name, "object": "model", "created": 0, "owned_by": "embedq"}
        return JSONResponse({"object": "list", "data": [entry]})

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            await client.redis.ping()
        except (redis.exceptions.RedisError, OSError) as error:
            return JSONResponse(
                {
                    "status": "unavailable",
                    "broker": redact(settings.broker_url),
                    "reason": f"broker unreachable: {error}",
                },
                status_code=503,
            )
        replies = await asyncio.to_thread(_ping_workers, client, opts.ping_timeout_s)
        if not replies:
            return JSONResponse(
                {
                    "status": "unavailable",
                    "broker": "ok",
                    "reason": f"no worker answered a ping within {opts.ping_timeout_s:g} s",
                },
                status_code=503,
            )
        return JSONResponse(
            {
                "status": "ok",
                "broker": "ok",
                "worker": replies[0],
                "model": client.model.name,
                "queue_depth": await client.queue_depth(),
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        text = await asyncio.to_thread(render, registry)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _ping_workers(client: AsyncEmbedClient, timeout_s: float) -> list[str]:
    """Names of the workers that answered a Celery control ping within `timeout_s`."""
    # limit=1: the first answer proves the fleet is up; waiting for every worker would cost the whole timeout.
    replies = client.sender.control.ping(timeout=timeout_s, limit=1) or []
    return [name for reply in replies for name in reply]


def serve(settings: Settings, host: str, port: int, options: GatewayOptions | None = None) -> None:
    """Run the gateway under uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    uvicorn.run(create_app(settings, options), host=host, port=port, log_level="warning")
