"""Deadlines that travel with web requests: a chunk whose caller already gave up is dropped unrun.

A web request (the Python clients' `timeout=`, the gateway's `--timeout`) sends each of its chunks with
an absolute deadline, `options["deadline"]`, in seconds since the epoch (wall clock: it crosses machines,
so hosts need NTP-synchronised clocks, as Celery's own `expires` does). A worker that picks up a chunk
after its deadline returns at once, before the model runs, stores nothing, publishes no event, and adds
one to the stats hash's `chunks_expired:LANE:MODEL` field, which `/metrics` exports as
`embedq_chunks_expired_total{model,lane}`. Corpus jobs send no deadline: they never expire.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from workers.protocol.queues import BULK, INTERACTIVE

#: The task option holding the absolute deadline (epoch seconds).
OPTION = "deadline"
#: Prefix of the stats-hash fields counting expired chunks, one per (lane, model).
FIELD_PREFIX = "chunks_expired:"


def deadline_in(timeout_s: float | None, now: float | None = None) -> float | None:
    """The absolute deadline of a request that waits `timeout_s` from now (None: it waits forever)."""
    if timeout_s is None:
        return None
    return (time.time() if now is None else now) + timeout_s


def seconds_late(options: Mapping[str, Any], now: float | None = None) -> float | None:
    """How long past its deadline a chunk is, or None when it has none or it is not yet due."""
    deadline = options.get(OPTION)
    if deadline is None:
        return None
    late = (time.time() if now is None else now) - float(deadline)
    return late if late > 0 else None


def lane_of(routing_key: object) -> str:
    """The lane a message came through, from its routing key (a queue name may carry a model suffix)."""
    # The lane is the part before the first dot (workers/protocol/routing.py): a model named "x-interactive"
    # on the bulk lane is still bulk.
    lane = str(routing_key or "").partition(".")[0]
    return INTERACTIVE if lane == INTERACTIVE else BULK


def stats_field(lane: str, model: str) -> str:
    """The stats-hash field counting the expired chunks of `model` on `lane`."""
    return f"{FIELD_PREFIX}{lane}:{model}"


def expired_counts(stats: Mapping[str, int]) -> Iterator[tuple[str, str, int]]:
    """(model, lane, count) for every expired-chunks field of a decoded stats hash."""
    for name, count in stats.items():
        if name.startswith(FIELD_PREFIX):
            lane, _, model = name[len(FIELD_PREFIX) :].partition(":")
            yield model, lane, count
