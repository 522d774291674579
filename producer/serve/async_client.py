"""The asyncio twin of `EmbedClient`: `await client.embed(texts)` never blocks the event loop.

It shares request planning, caching, waiting and event handling with the blocking client
(`producer.serve.client_core._Core`); only the I/O differs: it happens on redis.asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import redis
import redis.asyncio as aredis

from producer.serve.client import _ClientBase
from producer.serve.client_core import _Request
from workers.protocol import events
from workers.protocol.long_docs import TRUNCATE
from workers.protocol.queues import queue_depth_async
from workers.protocol.store import decode_result


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
        """Messages waiting in this model's interactive queue."""
        return await queue_depth_async(self.redis, self._core.keys, self._core.queue)

    async def embed(
        self,
        texts: str | Sequence[str],
        timeout: float | None = 30.0,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
        long: str = TRUNCATE,
    ) -> np.ndarray:
        """Embed `texts` -> float32 (n, dim); see `EmbedClient.embed` for the options, `embed_with_usage` for
        the token count too."""
        matrix, _ = await self.embed_with_usage(
            texts, timeout, prompt_name=prompt_name, prompt=prompt, dimensions=dimensions, long=long
        )
        return matrix

    async def embed_with_usage(
        self,
        texts: str | Sequence[str],
        timeout: float | None = 30.0,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
        long: str = TRUNCATE,
    ) -> tuple[np.ndarray, int]:
        """The matrix and the tokens the workers embedded for it (cached texts cost none)."""
        core = self._core
        request = core.plan(texts, self.check_options(prompt_name, prompt, dimensions, long))
        await self.check_served()
        cache_changes: dict[str, int] = {}
        if core.cache is not None and request.unique:
            values = cast(list[bytes | None], await self.redis.mget(core.cache.keys_for(request.unique, request.extra)))
            cache_changes = core.apply_cache(request, values)
        async with self.redis.pipeline(transaction=False) as pipe:
            for (key, name), amount in core.counters(cache_changes).items():
                pipe.hincrby(key, name, amount)
            await pipe.execute()
        sends = core.chunk_up(request)
        if sends:
            # Publishing is a quick Redis LPUSH, but kombu's API is blocking: keep it off the loop.
            await asyncio.to_thread(core.send, request, sends, timeout)
        try:
            for wait_s in core.waits(request, timeout):
                item = await self.redis.blpop([core.keys.events(request.job)], timeout=wait_s)
                if item is not None:
                    await self._take(request, events.parse(item[1]))
        finally:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self.redis.delete(*core.cleanup_keys(request))
        return request.matrix(request.extra.get("dimensions") or core.dim), request.tokens

    async def check_served(self) -> None:
        """ModelNotServed at once when live workers serve only other models (read at most every REFRESH_S)."""
        core = self._core
        if core.served.stale(core.model.name):
            await core.served.read_async(self.redis)
        core.check_served()

    async def _take(self, request: _Request, event: events.ChunkEvent) -> None:
        """Fold one event in: fetch and forget its result, and cache its rows."""
        key = self._core.keys.result(request.job, event["chunk"])
        array = decode_result(await self.redis.hgetall(key)) if event["type"] == "done" else None
        entries = self._core.on_event(request, event, array)
        await self.redis.delete(key)
        if entries:
            async with self.redis.pipeline(transaction=False) as pipe:
                for cache_key, value in entries:
                    pipe.set(cache_key, value, ex=self._core.cache_ttl_s)
                await pipe.execute()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.redis.aclose()
