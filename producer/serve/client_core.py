"""What the sync and async clients share (producer/serve/client.py, async_client.py): validating texts, the
model a client serves, one request's bookkeeping, and `_Core`, which plans, caches, sends and folds events in.
Only the I/O differs between the two clients, so everything else lives here once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from producer.job.broker import send_chunk, sender_app
from producer.job.readers import check_text
from producer.serve.cache import CacheStats, EmbeddingCache
from workers.protocol import deadlines, events
from workers.protocol.config import Settings
from workers.protocol.errors import (
    BrokerUnavailable,
    InvalidRecords,
    JobFailed,
    ModelError,
    RequestTimeout,
    ResultMissing,
)
from workers.protocol.keys import Keys, redact
from workers.protocol.model_info import ModelInfo, model_identity
from workers.protocol.model_registry import describe
from workers.protocol.queues import INTERACTIVE
from workers.protocol.routing import queue_name
from workers.protocol.served import ServedView

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
    #: This request's own task options (prompt, dimensions, long): part of its cache keys.
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
