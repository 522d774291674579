"""The Python client for web apps: `EmbedClient(broker_url).embed(texts)` and an asyncio twin.

A request is a tiny job: its texts are validated, looked up in the optional cache, split into
chunks sent to the `interactive` queue (workers take it before `bulk`), and the completion events
of its job are awaited on the job's Redis list; arrays come from the result store and their keys are
deleted. Nothing here imports torch.

    client = EmbedClient("redis://localhost:6379/0")
    vectors = client.embed(["a sentence", "another"], timeout=10)     # (2, dim) float32

    handle = client.submit(texts)          # returns at once
    handle.ready()                         # True once every chunk is back
    handle.result(timeout=10)

In FastAPI/Starlette views use `producer.serve.async_client.AsyncEmbedClient` (`await client.embed(texts)`):
waiting happens on redis.asyncio, so the event loop is never blocked. In Flask/Django use `EmbedClient` (thread-safe).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import redis
from celery import Celery

from producer.job.broker import send_chunk, sender_app
from producer.job.readers import check_text
from producer.serve.cache import DEFAULT_TTL_S, CacheStats, EmbeddingCache
from producer.serve.request_options import request_options
from workers.protocol import deadlines, events
from workers.protocol.config import Settings
from workers.protocol.errors import (
    BrokerUnavailable,
    EmbedqError,
    InvalidRecords,
    JobFailed,
    ModelError,
    ModelNotServed,
    RequestTimeout,
    ResultMissing,
)
from workers.protocol.keys import Keys, connect, redact
from workers.protocol.model_info import ModelInfo, model_identity
from workers.protocol.model_registry import describe
from workers.protocol.queues import INTERACTIVE, queue_depth
from workers.protocol.routing import queue_name
from workers.protocol.served import ServedView
from workers.protocol.store import RedisStore

#: Texts per task: small, so that a large request spreads over every worker.
DEFAULT_CHUNK_ROWS = 32


def validate_texts(texts: Any) -> list[str]:
    """`texts` as a list of strings, or InvalidRecords naming each bad index and why."""
    if not isinstance(texts, (str, list, tuple)):
        raise InvalidRecords([(0, f"expected a string or a list of strings, got {type(texts).__name__}")])
    items = [texts] if isinstance(texts, str) else texts
    problems = []
    # One check for a single string and for each list item: a lone surrogate is refused either way.
    for index, value in enumerate(items):
        reason = check_text(value, "input")
        if reason:
            problems.append((index, reason.replace("field 'input' ", "")))
    if problems:
        raise InvalidRecords(problems)
    return list(items)


def served_model(settings: Settings) -> ModelInfo:
    """The model the workers are asked for: as the fleet announced it, else read from its folder; one that
    neither describes is named only, and its width learnt from the first result."""
    try:
        return describe(settings, prefer_fleet=True)
    except (ModelError, BrokerUnavailable):
        # A folder on the workers' machines is known by its folder's name (workers/protocol/model_info.py).
        looks_like_path = settings.model.startswith(("/", ".", "~"))
        name = settings.model.rstrip("/").rsplit("/", 1)[-1] if looks_like_path else model_identity(settings.model)
        return ModelInfo(name, settings.model, False, "", 0, 0)


@dataclass
class _Request:
    """One request's bookkeeping: which unique texts each chunk carries and what came back."""

    job: str
    texts: list[str]
    #: Position of each input in `unique`.
    slots: list[int]
    unique: list[str]
    vectors: list[np.ndarray | None]
    chunks: dict[int, list[int]] = field(default_factory=dict)
    tokens: int = 0
    failures: list[str] = field(default_factory=list)
    #: This request's own task options (prompt, dimensions): part of its cache keys.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return not self.chunks or bool(self.failures)

    def matrix(self, dim_hint: int) -> np.ndarray:
        if self.failures:
            raise JobFailed(f"request {self.job}: {'; '.join(self.failures)}")
        if not self.texts:
            return np.zeros((0, dim_hint), dtype=np.float32)
        rows = [self.vectors[slot] for slot in self.slots]
        return np.stack(rows).astype(np.float32, copy=False)  # type: ignore[arg-type]


class _Core:
    """What the sync and async clients share: settings, planning, cache and event handling."""

    def __init__(
        self,
        broker_url: str | None,
        *,
        key_prefix: str | None,
        model: str | None,
        normalize: bool,
        cache: bool,
        cache_ttl_s: int,
        chunk_rows: int,
        settings: Settings | None,
    ) -> None:
        base = settings or Settings.from_env()
        changes = {k: v for k, v in (("broker_url", broker_url), ("key_prefix", key_prefix), ("model", model)) if v}
        self.settings = base.replace(**changes) if changes else base
        self.keys = Keys(self.settings.key_prefix)
        self.normalize = normalize
        self.use_cache = cache
        self.cache_ttl_s = cache_ttl_s
        self._describe(served_model(self.settings))
        #: This model's interactive queue: only its workers take the request's chunks (workers/protocol/routing.py).
        self.queue = queue_name(INTERACTIVE, self.model.name)
        #: Which models live workers serve on the interactive lane: a request for another fails at once.
        self.served = ServedView(self.keys, INTERACTIVE)
        self.chunk_rows = max(1, chunk_rows)
        self._next_describe_s = 0.0
        self.app = sender_app(self.settings)
        self.requests = 0
        self.texts = 0

    def _describe(self, model: ModelInfo) -> None:
        """Take `model` as what this client serves: width, pooling and length in every task, the cache namespace."""
        self.model = model
        self.dim = model.dim
        self.options: dict[str, Any] = {"model": model.name, "normalize": self.normalize, "results": "redis"}
        if model.pooling:
            self.options.update(pooling=model.pooling, max_length=model.max_length)
        self.cache = EmbeddingCache(self.keys, model.name, self.options, self.cache_ttl_s) if self.use_cache else None

    def describe_again(self) -> None:
        """A client built before any worker announced its model (one was still loading) knows only its name:
        read the announcement again, at most once a second, so its prompts and width become known."""
        if self.model.pooling or time.monotonic() < self._next_describe_s:
            return
        self._next_describe_s = time.monotonic() + 1.0
        model = served_model(self.settings)
        if model.pooling:
            self._describe(model)

    def plan(self, texts: Any, extra: dict[str, Any] | None = None) -> _Request:
        valid = validate_texts(texts)
        unique: dict[str, int] = {}
        slots = [unique.setdefault(text, len(unique)) for text in valid]
        self.requests += 1
        self.texts += len(valid)
        job = f"req-{uuid.uuid4().hex[:20]}"
        return _Request(job, valid, slots, list(unique), [None] * len(unique), extra=extra or {})

    def apply_cache(self, request: _Request, values: Sequence[bytes | None]) -> dict[str, int]:
        """Fill the request from the cache's MGET replies; returns the fleet counters to add."""
        assert self.cache is not None
        for slot, vector in enumerate(self.cache.decode(values)):
            request.vectors[slot] = vector
        hits = sum(1 for v in values if v is not None)
        return self.cache.stat_changes(hits, len(values) - hits)

    def chunk_up(self, request: _Request) -> list[tuple[int, list[str]]]:
        """Chunks of the texts still missing; records which slots each chunk fills."""
        missing = [slot for slot, vector in enumerate(request.vectors) if vector is None]
        sends = []
        for index, start in enumerate(range(0, len(missing), self.chunk_rows)):
            slots = missing[start : start + self.chunk_rows]
            request.chunks[index] = slots
            sends.append((index, [request.unique[slot] for slot in slots]))
        return sends

    def send(self, request: _Request, sends: list[tuple[int, list[str]]], expires_s: float | None = None) -> None:
        # The request's deadline travels with each chunk: a worker that gets to it after the caller gave up
        # drops it unrun and counts it (workers/protocol/deadlines.py), so abandoned requests leave no work,
        # no stored array and no events behind.
        options = {**self.options, **request.extra}
        deadline = deadlines.deadline_in(expires_s)
        if deadline is not None:
            options[deadlines.OPTION] = deadline
        for index, texts in sends:
            send_chunk(self.app, request.job, index, texts, options, queue=self.queue)

    def waits(self, request: _Request, timeout_s: float | None) -> Iterator[float]:
        """How long to wait for each next event until the request is done; RequestTimeout past `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # Short waits: a client's socket timeout may be shorter than the request's (redis-py 8 sets one).
        while not request.done:
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise self.timeout_error(request, timeout_s or 0.0)
            yield min(1.0, max(0.01, remaining))

    def on_event(
        self, request: _Request, event: events.ChunkEvent, array: np.ndarray | None
    ) -> list[tuple[str, bytes]]:
        """Fold one completion event into the request; returns the cache entries (key, value) to set."""
        chunk = event["chunk"]
        slots = request.chunks.pop(chunk, None)
        if slots is None:
            return []  # a duplicate delivery of a chunk already received
        if event["type"] == "failed":
            request.failures.append(f"chunk {chunk} failed: {event['reason']}")
            return []
        if array is None:
            raise ResultMissing(f"request {request.job} chunk {chunk} reported done but its result is gone")
        request.tokens += event["tokens"]
        for row, slot in enumerate(slots):
            request.vectors[slot] = array[row]
        if not self.dim and "dimensions" not in request.extra:
            self.dim = int(array.shape[1])
        if self.cache is None:
            return []
        keys = self.cache.keys_for([request.unique[slot] for slot in slots], request.extra)
        return [(key, self.cache.encode(array[row])) for row, key in enumerate(keys)]

    def cleanup_keys(self, request: _Request) -> list[str]:
        return [self.keys.events(request.job), self.keys.deliveries(request.job)]

    def timeout_error(self, request: _Request, timeout_s: float) -> RequestTimeout:
        return RequestTimeout(
            f"no result for {len(request.chunks)} of the request's chunks after {timeout_s:g} s: are workers "
            f"running and consuming the {self.queue!r} queue? (check GET /health or `embedq status`)"
        )

    def check_served(self) -> None:
        """ModelNotServed (at once) when live workers serve only other models on the interactive lane."""
        self.served.check(self.model.name, f" on {redact(self.settings.broker_url)}")

    def counters(self, cache_changes: dict[str, int]) -> dict[tuple[str, str], int]:
        """(hash, field) -> amount to add for one request: the cache's counters and the model's requests."""
        changes = {(self.keys.stats(), name): amount for name, amount in cache_changes.items()}
        changes[(self.keys.model_stats(), f"requests:{self.model.name}")] = 1
        return changes

    def stats(self) -> dict[str, Any]:
        cache = self.cache.stats if self.cache else CacheStats()
        return {
            "requests": self.requests,
            "texts": self.texts,
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "cache_hit_rate": round(cache.hit_rate, 4),
        }


class EmbedHandle:
    """A submitted request: `ready()` without waiting, `result(timeout)` waiting."""

    def __init__(self, client: EmbedClient, request: _Request) -> None:
        self._client = client
        self._request = request

    @property
    def job(self) -> str:
        return self._request.job

    @property
    def tokens(self) -> int:
        """Tokens the workers embedded for this request (cached texts cost none)."""
        return self._request.tokens

    def ready(self) -> bool:
        """True once every chunk is back (or one failed); never blocks."""
        while not self._request.done and self._client._take(self._request, timeout_s=None):
            pass
        return self._request.done

    def result(self, timeout: float | None = 30.0) -> np.ndarray:
        """The (n, dim) float32 matrix in input order; RequestTimeout after `timeout` seconds."""
        try:
            for wait_s in self._client._core.waits(self._request, timeout):
                self._client._take(self._request, timeout_s=wait_s)
        finally:
            self._client._finish(self._request)
        return self._request.matrix(self._request.extra.get("dimensions") or self._client.dim)


class _ClientBase:
    """What both clients share: the request core built from the same arguments, and its properties."""

    def __init__(
        self,
        broker_url: str | None = None,
        *,
        key_prefix: str | None = None,
        model: str | None = None,
        normalize: bool = True,
        cache: bool = False,
        cache_ttl_s: int = DEFAULT_TTL_S,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        settings: Settings | None = None,
    ) -> None:
        self._core = _Core(
            broker_url,
            key_prefix=key_prefix,
            model=model,
            normalize=normalize,
            cache=cache,
            cache_ttl_s=cache_ttl_s,
            chunk_rows=chunk_rows,
            settings=settings,
        )
        self._connect()

    def _connect(self) -> None:
        """Open the connections this kind of client waits on."""
        raise NotImplementedError

    @property
    def model(self) -> ModelInfo:
        return self._core.model

    def check_options(
        self, prompt_name: str | None = None, prompt: str | None = None, dimensions: int | None = None
    ) -> dict[str, Any]:
        """The task options a request with these arguments would send (its resolved prompt text and
        dimensions); UnknownPrompt or DimensionsUnsupported (both ConfigError) now, before anything is sent."""
        self._core.describe_again()
        return request_options(self._core.model, self._core.dim, prompt_name, prompt, dimensions)

    @property
    def dim(self) -> int:
        """Width of the vectors (learnt from the first result when the model folder is not local)."""
        return self._core.dim

    @property
    def settings(self) -> Settings:
        return self._core.settings

    @property
    def keys(self) -> Keys:
        return self._core.keys

    @property
    def stats(self) -> dict[str, Any]:
        """Requests, texts, and cache hits, misses and hit rate of this client."""
        return self._core.stats()

    @property
    def sender(self) -> Celery:
        """The Celery app this client sends with (for control commands such as ping)."""
        return self._core.app


class EmbedClient(_ClientBase):
    """Embeddings now, for web apps and scripts: thread-safe, blocking; see the module docstring."""

    def _connect(self) -> None:
        self.redis = connect(self._core.settings.broker_url)
        self.store = RedisStore(self.redis, self._core.keys, self._core.settings.result_ttl_s)

    def queue_depth(self) -> int:
        """Messages waiting in this model's interactive queue."""
        return queue_depth(self.redis, self._core.keys, self._core.queue)

    def embed(
        self,
        texts: str | Sequence[str],
        timeout: float | None = 30.0,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
    ) -> np.ndarray:
        """Embed `texts` (a string counts as one text) -> float32 (n, dim), rows in input order.

        `prompt_name`: one of the folder's sentence-transformers prompts (else `prompt`, a text of your own, else
        its default); `dimensions`: the first N components, normalised unless normalize=False. Workers drop the
        chunks they reach after `timeout`.
        """
        handle = self.submit(texts, expires_s=timeout, prompt_name=prompt_name, prompt=prompt, dimensions=dimensions)
        return handle.result(timeout)

    def submit(
        self,
        texts: str | Sequence[str],
        expires_s: float | None = None,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
    ) -> EmbedHandle:
        """Send the request and return at once; InvalidRecords if any text is not a valid string, UnknownPrompt
        or DimensionsUnsupported (both ConfigError) for a prompt name or width the model does not have.

        With `expires_s`, workers drop the request's chunks they reach only after that many seconds, unrun.
        """
        core = self._core
        request = core.plan(texts, self.check_options(prompt_name, prompt, dimensions))
        if core.served.stale(core.model.name):
            core.served.read(self.redis)
        core.check_served()
        cache_changes: dict[str, int] = {}
        if core.cache is not None and request.unique:
            values = cast(list[bytes | None], self.redis.mget(core.cache.keys_for(request.unique, request.extra)))
            cache_changes = core.apply_cache(request, values)
        with self.redis.pipeline(transaction=False) as pipe:
            for (key, name), amount in core.counters(cache_changes).items():
                pipe.hincrby(key, name, amount)
            pipe.execute()
        core.send(request, core.chunk_up(request), expires_s)
        return EmbedHandle(self, request)

    def _take(self, request: _Request, timeout_s: float | None) -> bool:
        """Handle one event; None means do not wait. False when there was none."""
        key = self._core.keys.events(request.job)
        if timeout_s is None:
            raw = self.redis.lpop(key)
        else:
            item = self.redis.blpop([key], timeout=timeout_s)
            raw = item[1] if item else None
        if raw is None:
            return False
        event = events.parse(cast(bytes, raw))
        array = self.store.get(request.job, event["chunk"]) if event["type"] == "done" else None
        entries = self._core.on_event(request, event, array)
        self.store.delete(request.job, event["chunk"])
        if entries:
            with self.redis.pipeline(transaction=False) as pipe:
                for key, value in entries:
                    pipe.set(key, value, ex=self._core.cache_ttl_s)
                pipe.execute()
        return True

    def _finish(self, request: _Request) -> None:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):  # they expire on their own anyway
            self.redis.delete(*self._core.cleanup_keys(request))

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


__all__ = [
    "EmbedClient",
    "EmbedHandle",
    "EmbedqError",
    "InvalidRecords",
    "ModelNotServed",
    "RequestTimeout",
    "validate_texts",
]
