"""Which models the fleet serves right now, read from the worker liveness keys, and the error for the rest.

Each live worker's record (workers/protocol/liveness.py) names the model it serves and the queues it
consumes. A model is served on a lane when some live worker consumes that model's queue for it
(workers/protocol/routing.py). Producers check before they send: a model that no live worker serves,
while others are served, is refused at once (`ModelNotServed`: HTTP 404, exit 2, an exception in the
clients) instead of waiting for a timeout. A fleet with no live worker at all is left to the existing
rules (the clients' RequestTimeout, the CLI's exit 7): it is starting, restarting or scaled to zero,
and says nothing about models.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aredis

from workers.protocol.errors import ModelNotServed
from workers.protocol.keys import Keys
from workers.protocol.liveness import live_workers, live_workers_async
from workers.protocol.model_info import DEFAULT_MODEL_NAME
from workers.protocol.routing import model_queues, queue_name

#: How long the clients and the gateway trust what they last read (a worker that just started or died is
#: seen within this, next to the liveness keys' own TTL).
REFRESH_S = 1.0


def served_models(records: Iterable[dict[str, Any]], lane: str | None = None) -> dict[str, list[str]]:
    """Model -> hostnames of the live workers that consume its `lane` queue (any of its queues when None)."""
    served: dict[str, list[str]] = {}
    for record in records:
        model = str(record.get("model") or DEFAULT_MODEL_NAME)
        queues = set(record.get("queues") or model_queues(model))
        wanted = {queue_name(lane, model)} if lane else set(model_queues(model))
        if queues & wanted:
            served.setdefault(model, []).append(str(record.get("hostname", "?")))
    return served


def not_served(model: str, served: Iterable[str], where: str = "", lane: str | None = None) -> ModelNotServed:
    """The one-line error for `model`, naming the models that are served."""
    names = sorted(served)
    on_lane = f" on the {lane!r} lane" if lane else ""
    return ModelNotServed(
        f"model {model!r} is not served here (no live worker{where} serves it{on_lane}); "
        f"served: {', '.join(names) or 'none'} "
        f"(pick one of those, or start a worker for it: embedq worker --model {model})",
        model=model,
        served=names,
    )


@dataclass
class ServedView:
    """What a client or gateway last read of the fleet, refreshed at most every REFRESH_S."""

    keys: Keys
    lane: str | None = None
    refresh_s: float = REFRESH_S
    served: dict[str, list[str]] = field(default_factory=dict)
    alive: int = 0
    _read_at: float = float("-inf")

    def stale(self, model: str | None = None) -> bool:
        """True when it is time to read again; a model not seen is read again sooner (it may have just started)."""
        age = time.monotonic() - self._read_at
        return age >= self.refresh_s or (model is not None and model not in self.served and age >= 0.1)

    def update(self, records: list[dict[str, Any]]) -> ServedView:
        self.alive = len(records)
        self.served = served_models(records, self.lane)
        self._read_at = time.monotonic()
        return self

    def read(self, client: redis.Redis) -> ServedView:
        return self.update(live_workers(client, self.keys))

    async def read_async(self, client: aredis.Redis) -> ServedView:
        return self.update(await live_workers_async(client, self.keys))

    def check(self, model: str, where: str = "") -> None:
        """ModelNotServed when live workers exist and none of them serves `model` on this view's lane."""
        if self.alive and model not in self.served:
            raise not_served(model, self.served, where, self.lane)


def wait_until_served(
    client: redis.Redis, keys: Keys, model: str, lane: str, *, wait_s: float, where: str = ""
) -> dict[str, list[str]]:
    """The served models once `model` is among them; ModelNotServed when live workers serve only others after
    `wait_s` (0: at once). Returns at once too when no worker is alive: that is the worker check's to judge."""
    view = ServedView(keys, lane)
    deadline = time.monotonic() + wait_s
    while True:
        view.read(client)
        if not view.alive or model in view.served:
            return view.served
        if time.monotonic() >= deadline:
            view.check(model, where)
        time.sleep(0.5)
