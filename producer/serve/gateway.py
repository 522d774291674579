"""The HTTP gateway: OpenAI's embeddings API in front of the worker fleet (`embedq serve`).

    POST /v1/embeddings   {"input": "text" | ["text", ...], "model": ..., "encoding_format": "float" | "base64",
                           "dimensions": N, "prompt_name": NAME | "prompt": TEXT, "long": "truncate" | "chunk-mean"}
    GET  /v1/models       every model some live worker serves (producer/serve/model_clients.py)
    GET  /health          200 when the broker answers, a worker replies to a ping and one has loaded its model
    GET  /metrics         Prometheus: embedq's fleet counters and the gateway's own request timings

Requests go to the `interactive` lane through `AsyncEmbedClient`, so a view never blocks the event
loop. Whatever a client sends, `/v1/*` answers 200 or a 4xx in OpenAI's error shape (see
`producer.serve.gateway_guard`); only the fleet itself (no worker in time, a broker gone) gives 5xx. How
much one gateway takes in (connections, slow clients, requests in flight) is `producer.serve.limits`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Histogram

from producer.serve.async_client import AsyncEmbedClient
from producer.serve.client_core import validate_texts
from producer.serve.gateway_guard import ApiError, Guard, install_error_handlers, log
from producer.serve.limits import RETRY_AFTER_S, Admission, HttpLimits, Overloaded, protocol_class
from producer.serve.metrics import fleet_registry, render
from producer.serve.model_clients import ModelClients
from workers.protocol.config import Settings
from workers.protocol.dimensions import DimensionsUnsupported
from workers.protocol.errors import ConfigError, InvalidRecords, JobFailed, ModelNotServed, QueueFull, RequestTimeout
from workers.protocol.keys import connect, redact
from workers.protocol.long_docs import TRUNCATE, LongPolicyUnsupported

MIB = 1 << 20
#: Redis connections beyond one per request in flight: /health, /metrics and the cache's pipelines.
POOL_HEADROOM = 16
#: /health and /metrics at once; more get 429 (a scrape storm must not take the requests' connections).
MAX_PROBES = 8


@dataclass(frozen=True)
class GatewayOptions:
    """Limits and switches of one gateway process."""

    #: Items in one request's `input` (OpenAI allows 2048).
    max_inputs: int = 2048
    max_body_bytes: int = 8 * MIB
    #: Characters of all texts in one request (about 4 per token): more is 413, so that one request cannot
    #: hold the workers past its own timeout (~125k tokens take ~25 s on 2 cores, README Performance).
    max_request_chars: int = 500_000
    #: Messages waiting in the interactive queue beyond which requests get 429.
    max_queue: int = 1000
    #: Requests waiting on workers at once (each holds one Redis connection); the pool is sized from it.
    max_concurrency: int = 256
    #: Requests queued for one of those slots; the next one gets 429.
    max_waiting: int = 1024
    timeout_s: float = 60.0
    cache: bool = True
    cache_ttl_s: int = 24 * 3600
    #: How long /health waits for a worker to answer a ping.
    ping_timeout_s: float = 1.0
    http: HttpLimits = field(default_factory=HttpLimits)


def parse_input(raw: Any, max_inputs: int) -> list[str]:
    """`input` as a list of texts; too many items is 413, token arrays and anything not text a clear 400."""
    if raw is None:
        raise ApiError(400, "'input' is required: a string or a list of strings", param="input")
    if isinstance(raw, list):
        if len(raw) > max_inputs:
            raise ApiError(
                413,
                f"'input' has {len(raw)} items; send at most {max_inputs} per request",
                param="input",
                code="too_many_inputs",
            )
        if not raw:
            raise ApiError(400, "'input' is an empty list; send at least one text", param="input")
        if all(isinstance(item, (int, list)) and not isinstance(item, bool) for item in raw):
            raise ApiError(
                400,
                "'input' is token ids; embedq tokenizes itself: send the texts as strings "
                "(LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False); "
                "LlamaIndex: OpenAILikeEmbedding, which sends text, rather than OpenAIEmbedding)",
                param="input",
                code="token_arrays_unsupported",
            )
    try:
        return validate_texts(raw)  # one check for a single string and for each list item
    except InvalidRecords as error:
        raise ApiError(400, str(error), param="input", code="invalid_input") from None


def parse_options(body: dict[str, Any]) -> tuple[str, int | None]:
    """(encoding_format, dimensions) of a request; `model` must be a string (which model serves it, and a 404
    for one nobody serves, is ModelClients.pick's), `dimensions` is checked against the width by `request_variant`."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string, got {type(model).__name__}", param="model")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' {encoding_format!r}: use float or base64", param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
        raise ApiError(400, f"'dimensions' must be a positive integer, got {dimensions!r:.80}", param="dimensions")
    return encoding_format, dimensions


def request_variant(
    client: AsyncEmbedClient, body: dict[str, Any], dimensions: int | None
) -> tuple[tuple[str, Any], ...]:
    """The request's `prompt_name` or `prompt`, `dimensions` and `long` as keyword pairs for the client, checked
    now (a clear 400) so that one bad request never fails the others coalesced with it."""
    prompt_name = body.get("prompt_name")
    if prompt_name is not None and not isinstance(prompt_name, str):
        raise ApiError(400, f"'prompt_name' must be a string, got {type(prompt_name).__name__}", param="prompt_name")
    # A prompt text of the caller's own, as sentence-transformers' `prompt=`; "" embeds with none (the folder's
    # default prompt included).
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ApiError(400, f"'prompt' must be a string, got {type(prompt).__name__}", param="prompt")
    if prompt is not None and prompt_name is not None:
        raise ApiError(400, "send 'prompt_name' or 'prompt', not both", param="prompt")
    long = body.get("long") or TRUNCATE
    if not isinstance(long, str):
        raise ApiError(400, f"'long' must be a string, got {type(long).__name__}", param="long")
    try:
        client.check_options(prompt_name=prompt_name, prompt=prompt, dimensions=dimensions, long=long)
    except DimensionsUnsupported as error:
        raise ApiError(400, str(error), param="dimensions", code="dimensions_unsupported") from None
    except LongPolicyUnsupported as error:
        raise ApiError(400, str(error), param="long", code="long_unsupported") from None
    except ConfigError as error:
        raise ApiError(400, str(error), param="prompt_name", code="prompt_name_unknown") from None
    return (("prompt_name", prompt_name), ("prompt", prompt), ("dimensions", dimensions), ("long", long))


def encode_rows(matrix: np.ndarray, encoding_format: str) -> list[Any]:
    if encoding_format == "base64":
        return [base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii") for row in matrix]
    return matrix.tolist()  # type: ignore[no-any-return]


class ClientGone(Exception):
    """Raised when the client hangs up before its request body is complete."""


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 past `limit` bytes (counted as it arrives) or 408 after `timeout_s`."""
    close = {"Connection": "close"}  # the rest of the body would otherwise be read as the next request
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            f"request body of {int(declared)} bytes is over the limit of {limit} bytes",
            code="request_too_large",
            headers=close,
        )
    deadline = time.monotonic() + timeout_s
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ApiError(
                408,
                f"request body not complete within {timeout_s:g} s ({len(body)} bytes received)",
                code="body_timeout",
                headers=close,
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientGone(f"client hung up after {len(body)} bytes of the body")
        body += message.get("body", b"")
        if len(body) > limit:
            raise ApiError(
                413, f"request body is over the limit of {limit} bytes", code="request_too_large", headers=close
            )
        if not message.get("more_body", False):
            return bytes(body)


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; invalid JSON, too deep a nesting or another type is a 400."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:  # RecursionError: thousands of nested brackets
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise ApiError(400, f"request body is not valid JSON: {reason}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


def create_app(settings: Settings, options: GatewayOptions | None = None) -> Guard:
    """The gateway (an ASGI app) for the workers behind `settings.broker_url`."""
    opts = options or GatewayOptions()

    def model_client(model: str | None = None) -> AsyncEmbedClient:
        return AsyncEmbedClient(
            settings=settings.replace(model=model) if model else settings,
            cache=opts.cache,
            cache_ttl_s=opts.cache_ttl_s,
            max_connections=opts.max_concurrency + POOL_HEADROOM,
        )

    client = model_client()
    clients = ModelClients(client, model_client)
    sync_redis = connect(settings.broker_url, check=False)
    admission = Admission(opts.max_concurrency, opts.max_waiting, opts.timeout_s)
    probes = Admission(MAX_PROBES, 4 * MAX_PROBES)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await clients.aclose()
        sync_redis.close()

    # No trailing-slash redirects: their Location would be built from the client's Host header.
    app = FastAPI(title="embedq gateway", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    registry = fleet_registry(sync_redis, client.keys)
    latency = Histogram(
        "embedq_gateway_request_seconds",
        "Gateway request latency",
        ["path", "status"],
        registry=registry,
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2.5, 5, 10, 30),
    )
    app.state.client = client
    install_error_handlers(app)

    def overloaded(error: Exception, code: str) -> ApiError:
        return ApiError(
            429, str(error), kind="rate_limit_error", code=code, headers={"Retry-After": str(RETRY_AFTER_S)}
        )

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        try:
            async with admission.slot():
                return await embed(request)
        except Overloaded as error:
            raise overloaded(error, "gateway_busy") from None
        except ClientGone as error:
            peer = f"{request.client.host}:{request.client.port}" if request.client else "a client"
            log.warning("gateway: %s on POST /v1/embeddings: %s", peer, error)
            return Response(status_code=400)  # nobody reads it; uvicorn drops it

    async def embed(request: Request) -> Response:
        body = parse_json(await read_body(request, opts.max_body_bytes, opts.http.body_timeout_s))
        texts = parse_input(body.get("input"), opts.max_inputs)
        chars = sum(len(text) for text in texts)
        if chars > opts.max_request_chars:
            raise ApiError(
                413,
                f"'input' holds {chars} characters; send at most {opts.max_request_chars} per request "
                "(split it into several requests)",
                param="input",
                code="input_too_large",
            )
        model = body.get("model")
        try:
            # The request's model picks the client, and with it the model's own queues.
            chosen = await clients.pick(model if isinstance(model, str) else None)
        except ModelNotServed as error:
            raise ApiError(404, str(error), param="model", code="model_not_found") from None
        target = chosen.client
        encoding_format, dimensions = parse_options(body)
        variant = request_variant(target, body, dimensions)
        depth = await target.queue_depth()
        if depth >= opts.max_queue:
            queue_full = QueueFull(
                f"the interactive queue holds {depth} requests for {target.model.name} (limit {opts.max_queue}); "
                "retry shortly"
            )
            raise overloaded(queue_full, "queue_full")
        try:
            matrix, tokens = await chosen.coalescer.embed(texts, opts.timeout_s, variant)
        except ModelNotServed as error:
            raise ApiError(404, str(error), param="model", code="model_not_found") from None
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
        rows = encode_rows(matrix, encoding_format)
        return JSONResponse(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
                "model": target.model.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        try:
            names = await clients.served()
        except (redis.exceptions.RedisError, OSError) as error:
            raise ApiError(
                503, f"broker unreachable: {error}", kind="server_error", code="broker_unavailable"
            ) from None
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "embedq"} for name in names]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            async with probes.slot():
                return await fleet_health()
        except Overloaded as error:
            raise overloaded(error, "too_many_probes") from None

    async def fleet_health() -> JSONResponse:
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
        # A worker's main process answers pings while its children are still loading (or failing to load)
        # the model; a child records its model only once loaded (workers/protocol/model_registry.py).
        if replies and not await client.redis.hlen(client.keys.models()):
            return JSONResponse(
                {"status": "unavailable", "broker": "ok", "reason": "no worker has loaded its model yet"},
                status_code=503,
            )
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
        try:
            async with probes.slot():
                text = await asyncio.to_thread(render, registry)
        except Overloaded as error:
            raise overloaded(error, "too_many_probes") from None
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return Guard(app, settings.api_key, latency)


def _ping_workers(client: AsyncEmbedClient, timeout_s: float) -> list[str]:
    """Names of the workers that answered a Celery control ping within `timeout_s`."""
    # limit=1: the first answer proves the fleet is up; waiting for every worker would cost the whole timeout.
    replies = client.sender.control.ping(timeout=timeout_s, limit=1) or []
    return [name for reply in replies for name in reply]


def serve(settings: Settings, host: str, port: int, options: GatewayOptions | None = None) -> None:
    """Run the gateway under uvicorn until SIGINT/SIGTERM, with the slow-client and connection limits."""
    import uvicorn

    opts = options or GatewayOptions()
    uvicorn.run(
        create_app(settings, opts),
        host=host,
        port=port,
        log_level="warning",
        http=protocol_class(opts.http),
        timeout_keep_alive=opts.http.keep_alive_timeout_s,
        h11_max_incomplete_event_size=opts.http.max_header_bytes,
        # Requests still waiting on workers at shutdown get this long, then their connections close.
        timeout_graceful_shutdown=5,
    )
