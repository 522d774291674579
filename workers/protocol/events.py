"""Completion events: how a worker tells the producer that a chunk is stored, or failed for good.

Each job has one Redis list of small JSON events; the producer pops them with BLPOP, so it learns
of completions without polling the result backend (which embedq does not use for arrays). The two
shapes below are the whole protocol: workers write them, the corpus job and the clients read them
through `parse`, which refuses anything else.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypedDict, get_type_hints

import redis

from workers.protocol.errors import EmbedqError
from workers.protocol.keys import Keys

EVENTS_TTL_S = 7 * 24 * 3600
#: Why a producer sent a chunk again (producer/job/dispatcher.py); counted as `resent_<reason>` in the fleet
#: counters and exported as embedq_chunks_resent_total{reason=...}.
RESEND_REASONS = ("holder_silent", "straggler_backup", "redis_restarted", "stall", "result_vanished")


#: What the worker logs and the producer prints when a done event says `emulated` (once per child, per job).
EMULATED_BF16 = (
    "dtype bf16 on a CPU without native bf16 (avx512_bf16 or AMX) runs emulated, several times slower than fp32 "
    "there: use --dtype auto (fp32 on such a CPU) or fp32"
)


class _ChunkDoneNotes(TypedDict, total=False):
    """What a done event says only when it applies (checked when present; older workers never send it)."""

    #: True when bf16 ran emulated on a CPU without native bf16 (workers/encoder/device.py).
    emulated: bool


class ChunkDone(_ChunkDoneNotes):
    """A chunk's rows are in the result store (also the task's return value, which Flower shows)."""

    type: Literal["done"]
    chunk: int
    #: Which copy of the chunk this is (0 for the first send; re-sends and backups count up).
    attempt: int
    rows: int
    dim: int
    tokens: int
    padded_tokens: int
    truncated: int
    batches: int
    dtype: str
    ms: float
    #: host:pid of the pool child that ran it.
    worker: str


class ChunkFailed(TypedDict):
    """A chunk failed for good (not retryable, or it killed its worker max_deliveries times)."""

    type: Literal["failed"]
    chunk: int
    reason: str
    quarantined: bool
    #: The host that gave up on it.
    worker: str


ChunkEvent = ChunkDone | ChunkFailed
_SHAPES: dict[str, type] = {"done": ChunkDone, "failed": ChunkFailed}


class BadEvent(EmbedqError):
    """An event on a job's list that is not one of the shapes above (a foreign writer, a version skew)."""


def _fits(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def parse(raw: bytes | str) -> ChunkEvent:
    """One event from its JSON; BadEvent naming the field when it is not a ChunkDone or a ChunkFailed."""
    try:
        event = json.loads(raw)
    except ValueError as error:
        raise BadEvent(f"chunk event is not JSON: {error}") from None
    shape = _SHAPES.get(str(event.get("type"))) if isinstance(event, dict) else None
    if shape is None:
        raise BadEvent(f"chunk event {str(raw)[:200]!r}: 'type' must be one of {', '.join(_SHAPES)}")
    optional: frozenset[str] = getattr(shape, "__optional_keys__", frozenset())
    for name, kind in get_type_hints(shape).items():
        if name == "type" or (name in optional and name not in event):
            continue
        if not _fits(event.get(name), kind):
            raise BadEvent(f"chunk event {str(raw)[:200]!r}: field {name!r} must be {kind.__name__}")
    return event  # type: ignore[no-any-return]


#: Fleet counters also kept per model (`Keys.model_stats()`, field `counter:model`), for /metrics' model label.
MODEL_COUNTERS = ("docs", "tokens", "chunks_done", "chunks_failed", "requests")


def publish(
    client: redis.Redis,
    keys: Keys,
    job: str,
    event: ChunkEvent,
    stats: dict[str, int] | None = None,
    *,
    model: str = "",
) -> None:
    """Append `event` to the job's list, and add `stats` to the fleet counters (and `model`'s), in one round trip."""
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(keys.events(job), json.dumps(event, separators=(",", ":")))
        pipe.expire(keys.events(job), EVENTS_TTL_S)
        for name, amount in (stats or {}).items():
            pipe.hincrby(keys.stats(), name, amount)
            if model and name in MODEL_COUNTERS:
                pipe.hincrby(keys.model_stats(), f"{name}:{model}", amount)
        pipe.execute()


def pop(client: redis.Redis, keys: Keys, job: str, timeout_s: float) -> ChunkEvent | None:
    """The next event of `job`, or None after `timeout_s` without one."""
    item = client.blpop([keys.events(job)], timeout=timeout_s)
    if item is None:
        return None
    return parse(item[1])
