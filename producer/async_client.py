"""The asyncio twin of `EmbedClient`: `await client.embed(texts)` never blocks the event loop.

It shares request planning, caching and event handling with the blocking client (`producer.client`);
only the waiting differs: it happens on redis.asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import redis
import redis.asyncio as aredis

from producer.client import INTERACTIVE, _ClientBase
from workers.keys import queue_keys


class AsyncEmbedClient(_ClientBase):
    """The asyncio client: `await embed(texts)` never blocks the event loop (redis.asyncio underneath).

    `max_connections` bounds its Redis pool; a request that finds every connection taken waits for
    one (up to `pool_timeout_s`) rather than failing with "Too many connections". Size it from the
    concurrency the caller allows: each `embed` in flight holds one connection while it waits.
    """

    def __init__(self, *args: Any, max_connections: int = 100, pool_timeout_s: float = 30.0, **kwargs: Any) -> None:
        self._max_connections = max_connections
        self._pool_timeout_s = pool_timeout_s
        super().__init__(*args, **kwargs)

    def _connect(self) -> None:
        pool = aredis.BlockingConnectionPool.from_url(
            self._core.settings.broker_url,
            max_connections=self._max_connections,
            timeout=self._pool_timeout_s,
            socket_connect_timeout=5,
        )
        self.redis = aredis.Redis.from_pool(pool)

    async def queue_depth(self) -> int:
        """Messages waiting in the interactive queue, in all of kombu's priority lists."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in queue_keys(self._core.keys, INTERACTIVE):
                pipe.llen(key)
            return int(sum(await pipe.execute()))

    async def embed(self, texts: str | Sequence[str], timeout: float | None = 30.0) -> np.ndarray:
        """Embed `texts` -> float32 (n, dim); see `embed_with_usage` for the token count too."""
        matrix, _ = await self.embed_with_usage(texts, timeout)
        return matrix

    async def embed_with_usage(
        self, texts: str | Sequence[str], timeout: float | None = 30.0
    ) -> tuple[np.ndarray, int]:
        """The matrix and the tokens the workers embedded for it (cached texts cost none)."""
        core = self._core
        request = core.plan(texts)
        cache = core.cache
        if cache is not None and request.unique:
            values = cast(list[bytes | None], await self.redis.mget(cache.keys_for(request.unique)))
            core.apply_cache(request, values)
            hits = sum(1 for v in values if v is not None)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(core.keys.stats(), "cache_hits", hits)
                pipe.hincrby(core.keys.stats(), "cache_misses", len(values) - hits)
                await pipe.execute()
        sends = core.chunk_up(request)
        if sends:
            # Publishing is a quick Redis LPUSH, but kombu's API is blocking: keep it off the loop.
            await asyncio.to_thread(core.send, request, sends, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not request.done:
                remaining = 1.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise core.timeout_error(request, timeout or 0.0)
                item = await self.redis.blpop([core.keys.events(request.job)], timeout=min(1.0, max(0.01, remaining)))
                if item is None:
                    continue
                event = json.loads(item[1])
                chunk = int(event["chunk"])
                array = await self._fetch(request.job, chunk) if event.get("type") == "done" else None
                slots = core.on_event(request, event, array)
                await self.redis.delete(core.keys.result(request.job, chunk))
                if cache is not None and slots:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for slot in slots:
                            vector = request.vectors[slot]
                            assert vector is not None
                            pipe.set(cache.key(request.unique[slot]), cache.encode(vector), ex=cache.ttl_s)
                        await pipe.execute()
        finally:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self.redis.delete(*core.cleanup_keys(request))
        return request.matrix(core.dim), request.tokens

    async def _fetch(self, job: str, chunk: int) -> np.ndarray | None:
        fields = await self.redis.hgetall(self._core.keys.result(job, chunk))
        if not fields:
            return None
        rows, dim = int(fields[b"rows"]), int(fields[b"dim"])
        return np.frombuffer(cast(bytes, fields[b"data"]), dtype="<f4").reshape(rows, dim)

    async def aclose(self) -> None:
        await self.redis.aclose()
