"""The job record: the hash `Keys.job(id)` that a corpus job keeps up to date and `embedq status` reads.

Written by producer/job/runner.py (all fields at the start, the counters as chunks are sent and collected,
the outcome at the end) and read by producer/job/status.py; this dataclass is the one place that names
its fields and their types. Redis stores every value as a string: `from_hash` turns them back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

from redis.typing import EncodableT, FieldT

from workers.protocol.keys import JOB_DONE as DONE
from workers.protocol.keys import JOB_FAILED as FAILED
from workers.protocol.keys import JOB_RUNNING as RUNNING

__all__ = ["DONE", "FAILED", "RUNNING", "JobRecord"]
#: Counters the job increments (HINCRBY) as chunks are sent, collected, or fail for good.
SENT_CHUNKS, DONE_CHUNKS, FAILED_CHUNKS = "sent_chunks", "done_chunks", "failed_chunks"
#: Fields written when the job ends (`end_fields`).
_END = ("state", "rows", "chunks", "wall_s", "failures")

#: What HSET takes (redis-py's own types, so that a record's fields pass straight to it).
HashFields = dict[FieldT, EncodableT]


@dataclass(frozen=True)
class JobRecord:
    """One job's record; the outcome fields stay None while it runs."""

    input: str = "?"
    output: str = ""
    model: str = ""
    #: running, done or failed.
    state: str = "unknown"
    #: Unix time the job (this run of it) started.
    started: float = 0.0
    #: Lines of the input, counted before the job ran (0 when unknown, e.g. stdin).
    total_hint: int = 0
    #: Documents per chunk: turns chunk counts into document counts.
    chunk_rows: int = 0
    sent_chunks: int = 0
    done_chunks: int = 0
    failed_chunks: int = 0
    rows: int | None = None
    chunks: int | None = None
    wall_s: float | None = None
    failures: int | None = None
    #: The chunk plan's tail (producer/job/chunk_plan.py): chunk counts of a running job follow the same plan.
    tail_split: int = 0
    min_chunk_rows: int = 0

    def to_hash(self) -> HashFields:
        """The fields to HSET: every field that has a value."""
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}

    @staticmethod
    def end_fields(*, state: str, rows: int, chunks: int, wall_s: float, failures: int) -> HashFields:
        """The fields to HSET when the job ends (the start fields and counters stay as they are)."""
        ended = JobRecord(state=state, rows=rows, chunks=chunks, wall_s=round(wall_s, 3), failures=failures)
        return {name: value for name, value in ended.to_hash().items() if name in _END}

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> JobRecord:
        """The record from HGETALL (bytes or str); a field missing or unreadable keeps its default."""
        fields = {_text(k): _text(v) for k, v in raw.items()}
        values: dict[str, Any] = {}
        for name, kind in get_type_hints(cls).items():
            if name in fields:
                parsed = _parse(fields[name], kind)
                if parsed is not None:
                    values[name] = parsed
        return cls(**values)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse(raw: str, kind: Any) -> Any:
    """`raw` as `kind` (str, int, float, or one of those or None); None when it does not read."""
    base = next((k for k in (int, float, str) if k == kind or k in getattr(kind, "__args__", ())), str)
    try:
        # Counters may have been written as floats by an older writer: int(float()) reads both.
        return int(float(raw)) if base is int else float(raw) if base is float else raw
    except ValueError:
        return None
