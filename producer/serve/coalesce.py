"""Dynamic batching in the gateway: small requests that arrive together share one worker task.

Measured on `embedq up` (2 cores, one worker child): one task per one-sentence request served about
4 requests/s, so a burst of 1,000 waited minutes and timed out; the forward pass of a 32-text
batch costs little more than that of one text. So requests of at most `max_request_texts` texts are
held for up to `window_s` (2 ms) or until `batch_texts` texts are waiting, then embedded as one
request of the client, and each caller gets its own rows back. Larger requests go straight through.

Usage: a batch's tokens are split among its requests by their share of its characters, so
`usage.prompt_tokens` of a coalesced request is an estimate (exact for a request that ran alone).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable

import numpy as np

#: embed(texts, timeout_s, variant): `variant` is what requests must share to share a batch (prompt, dimensions, long).
EmbedFn = Callable[[list[str], float, Hashable], Awaitable[tuple[np.ndarray, int]]]
_Pending = list[tuple[list[str], "asyncio.Future[tuple[np.ndarray, int]]"]]


class Coalescer:
    """Collects concurrent small requests with the same variant into shared batches for `embed`."""

    def __init__(
        self,
        embed: EmbedFn,
        *,
        batch_texts: int = 32,
        max_request_texts: int = 8,
        window_s: float = 0.002,
    ) -> None:
        self._embed = embed
        self.batch_texts = batch_texts
        self.max_request_texts = max_request_texts
        self.window_s = window_s
        # One batch in the making per variant: requests with another prompt or width never share a task.
        self._pending: dict[Hashable, _Pending] = {}
        self._pending_texts: dict[Hashable, int] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._timeout_s = 60.0
        self._running: set[asyncio.Task[None]] = set()

    async def embed(self, texts: list[str], timeout_s: float, variant: Hashable = ()) -> tuple[np.ndarray, int]:
        """The (n, dim) matrix and tokens for `texts`, possibly computed together with other requests."""
        if len(texts) > self.max_request_texts:
            return await self._embed(texts, timeout_s, variant)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[np.ndarray, int]] = loop.create_future()
        self._pending.setdefault(variant, []).append((texts, future))
        self._pending_texts[variant] = self._pending_texts.get(variant, 0) + len(texts)
        self._timeout_s = timeout_s
        if self._pending_texts[variant] >= self.batch_texts:
            self._flush(variant)
        elif variant not in self._timers:
            self._timers[variant] = loop.call_later(self.window_s, self._flush, variant)
        return await future

    def _flush(self, variant: Hashable) -> None:
        timer = self._timers.pop(variant, None)
        if timer is not None:
            timer.cancel()
        batch = self._pending.pop(variant, [])
        self._pending_texts.pop(variant, None)
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch, self._timeout_s, variant))
            self._running.add(task)  # a reference, so that the task is not collected mid-flight
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: _Pending, timeout_s: float, variant: Hashable) -> None:
        texts = [text for request, _ in batch for text in request]
        try:
            matrix, tokens = await self._embed(texts, timeout_s, variant)
        except BaseException as error:  # every caller of the batch gets the batch's error
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        chars = [sum(len(text) + 1 for text in request) for request, _ in batch]
        start = 0
        for (request, future), size in zip(batch, chars, strict=True):
            rows = matrix[start : start + len(request)]
            start += len(request)
            if not future.done():
                future.set_result((rows, round(tokens * size / sum(chars))))
