"""Completion events: how a worker tells the producer that a chunk is stored, or failed for good.

Each job has one Redis list of small JSON events; the producer pops them with BLPOP, so it learns
of completions without polling the result backend (which embedq does not use for arrays).
"""

from __future__ import annotations

import json
from typing import Any

import redis

from workers.keys import Keys

EVENTS_TTL_S = 7 * 24 * 3600
#: Why a producer sent a chunk again (producer/dispatcher.py); counted as `resent_<reason>` in the fleet
#: counters and exported as embedq_chunks_resent_total{reason=...}.
RESEND_REASONS = ("holder_silent", "straggler_backup", "redis_restarted", "stall", "result_vanished")


def publish(
    client: redis.Redis, keys: Keys, job: str, event: dict[str, Any], stats: dict[str, int] | None = None
) -> None:
    """Append `event` to the job's list, and add `stats` to the fleet counters, in one round trip."""
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(keys.events(job), json.dumps(event, separators=(",", ":")))
        pipe.expire(keys.events(job), EVENTS_TTL_S)
        for name, amount in (stats or {}).items():
            pipe.hincrby(keys.stats(), name, amount)
        pipe.execute()


def pop(client: redis.Redis, keys: Keys, job: str, timeout_s: float) -> dict[str, Any] | None:
    """The next event of `job`, or None after `timeout_s` without one."""
    item = client.blpop([keys.events(job)], timeout=timeout_s)
    if item is None:
        return None
    event: dict[str, Any] = json.loads(item[1])
    return event
