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
from collections.abc import Awaitable, Callable

import numpy as np

EmbedFn = Callable[[list[str], float], Awaitable[tuple[np.ndarray, int]]]


class Coalescer:
    """Collects concurrent small requests into shared batches for `embed(texts, timeout_s)`."""

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
        self._pending: list[tuple[list[str], asyncio.Future[tuple[np.ndarray, int]]]] = []
        self._pending_texts = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timeout_s = 60.0
        self._running: set[asyncio.Task[None]] = set()

    async def embed(self, texts: list[str], timeout_s: float) -> tuple[np.ndarray, int]:
        """The (n, dim) matrix and tokens for `texts`, possibly computed together with other requests."""
        if len(texts) > self.max_request_texts:
            return await self._embed(texts, timeout_s)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[np.ndarray, int]] = loop.create_future()
        self._pending.append((texts, future))
        self._pending_texts += len(texts)
        self._timeout_s = timeout_s
        if self._pending_texts >= self.batch_texts:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._pending_texts = self._pending, [], 0
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch, self._timeout_s))
            self._running.add(task)  # a reference, so that the task is not collected mid-flight
            task.add_done_callback(self._running.discard)

    async def _run(
        self, batch: list[tuple[list[str], asyncio.Future[tuple[np.ndarray, int]]]], timeout_s: float
    ) -> None:
        texts = [text for request, _ in batch for text in request]
        try:
            matrix, tokens = await self._embed(texts, timeout_s)
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
