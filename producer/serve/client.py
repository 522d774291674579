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
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import redis
from celery import Celery

from producer.serve.cache import DEFAULT_TTL_S
from producer.serve.client_core import DEFAULT_CHUNK_ROWS, _Core, _Request, validate_texts
from producer.serve.request_options import request_options
from workers.protocol import events
from workers.protocol.config import Settings
from workers.protocol.errors import (
    EmbedqError,
    InvalidRecords,
    ModelNotServed,
    RequestTimeout,
)
from workers.protocol.keys import Keys, connect
from workers.protocol.long_docs import TRUNCATE
from workers.protocol.model_info import ModelInfo
from workers.protocol.queues import queue_depth
from workers.protocol.store import RedisStore


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
        self,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
        long: str = TRUNCATE,
    ) -> dict[str, Any]:
        """The task options a request with these arguments would send (its resolved prompt text, dimensions and
        long-text policy); UnknownPrompt, DimensionsUnsupported or LongPolicyUnsupported (all ConfigError) now,
        before anything is sent."""
        self._core.describe_again()
        return request_options(self._core.model, self._core.dim, prompt_name, prompt, dimensions, long)

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
        long: str = TRUNCATE,
    ) -> np.ndarray:
        """Embed `texts` (a string counts as one text) -> float32 (n, dim), rows in input order.

        `prompt_name`: one of the folder's sentence-transformers prompts (else `prompt`, a text of your own, else
        its default); `dimensions`: the first N components, normalised unless normalize=False; `long`: a text
        over the model's max length is cut (`truncate`) or embedded in overlapping windows averaged into its row
        (`chunk-mean`), as `embedq embed --long`. Workers drop the chunks they reach after `timeout`.
        """
        handle = self.submit(
            texts, expires_s=timeout, prompt_name=prompt_name, prompt=prompt, dimensions=dimensions, long=long
        )
        return handle.result(timeout)

    def submit(
        self,
        texts: str | Sequence[str],
        expires_s: float | None = None,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
        long: str = TRUNCATE,
    ) -> EmbedHandle:
        """Send the request and return at once; InvalidRecords if any text is not a valid string, UnknownPrompt,
        DimensionsUnsupported or LongPolicyUnsupported (all ConfigError) for a prompt name, width or long-text
        policy the request cannot get.

        With `expires_s`, workers drop the request's chunks they reach only after that many seconds, unrun.
        """
        core = self._core
        request = core.plan(texts, self.check_options(prompt_name, prompt, dimensions, long))
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
