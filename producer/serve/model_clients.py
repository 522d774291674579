"""The gateway's clients, one per model the fleet serves: a request's `model` picks which one sends it.

The gateway starts with the client of its own model (`--model` / `EMBEDQ_MODEL`, used when a request
names none); a request naming another model that some live worker serves gets that model's client,
built once and kept (each sends only to its model's queues, workers/protocol/routing.py). A model no
live worker serves is a 404 at once, naming the served ones. While no worker at all is alive (a fleet
starting or restarting), a model that a worker once announced is still accepted and waits like the
default does; any other name is refused, so unknown names never build clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from producer.serve.async_client import AsyncEmbedClient
from producer.serve.coalesce import Coalescer
from workers.protocol.errors import ModelNotServed
from workers.protocol.served import ServedView, not_served


@dataclass
class ModelClient:
    """One model's client and the coalescer that merges its concurrent requests."""

    client: AsyncEmbedClient
    coalescer: Coalescer

    @property
    def names(self) -> list[str]:
        """Names a request's `model` may use for it: its name, and its path when it is a folder."""
        model = self.client.model
        return [model.name] + ([model.path] if model.path and model.path != model.name else [])


class ModelClients:
    """The default model's client, and the others' built on first use."""

    def __init__(self, default: AsyncEmbedClient, make: Callable[[str], AsyncEmbedClient]) -> None:
        self.default = self._entry(default)
        self._make = make
        self._others: dict[str, ModelClient] = {}
        self._building = asyncio.Lock()
        #: Any lane: /v1/models lists every model a live worker serves.
        self.view = ServedView(default.keys)

    @staticmethod
    def _entry(client: AsyncEmbedClient) -> ModelClient:
        async def embed_variant(texts: list[str], timeout_s: float, variant: Hashable) -> tuple[np.ndarray, int]:
            # Requests coalesce only with those of the same variant (prompt, dimensions, long): gateway.request_variant.
            options = dict(cast(tuple[tuple[str, Any], ...], variant))
            return await client.embed_with_usage(texts, timeout=timeout_s, **options)

        return ModelClient(client, Coalescer(embed_variant))

    async def _read(self, model: str | None = None) -> ServedView:
        if self.view.stale(model):
            await self.view.read_async(self.default.client.redis)
        return self.view

    async def served(self) -> list[str]:
        """The models live workers serve; with none alive, the gateway's own model (it is all it can say)."""
        view = await self._read()
        return sorted(view.served) if view.alive else [self.default.client.model.name]

    async def pick(self, model: str | None) -> ModelClient:
        """The client for a request's `model` (None: the gateway's own); ModelNotServed when nobody serves it."""
        if model is None or model in self.default.names:
            return self.default
        if model in self._others:
            entry = self._others[model]
            view = await self._read(model)
            if view.alive and model not in view.served:
                raise not_served(model, view.served)
            return entry
        view = await self._read(model)
        if model not in view.served:
            announced = not view.alive and await self.default.client.redis.hexists(
                self.default.client.keys.models(), model
            )
            if not announced:
                raise not_served(model, view.served if view.alive else [self.default.client.model.name])
        async with self._building:
            if model not in self._others:
                # Built off the loop: describing the model reads what its workers announced (blocking Redis).
                self._others[model] = self._entry(await asyncio.to_thread(self._make, model))
        return self._others[model]

    async def aclose(self) -> None:
        for entry in [self.default, *self._others.values()]:
            await entry.client.aclose()


__all__ = ["ModelClient", "ModelClients", "ModelNotServed"]
