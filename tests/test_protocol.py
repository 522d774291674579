"""The protocol pieces both sides speak, each checked without a server: the job record, chunk events,
queue names and depth, key names."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from kombu.transport import redis as kombu_redis
from redis.connection import Encoder as RedisEncoder

from producer.job import record as job_record
from producer.job.record import JobRecord
from producer.job.status import job_status
from workers.protocol import events
from workers.protocol.config import Settings, celery_config
from workers.protocol.keys import Keys
from workers.protocol.queues import PRIORITY_SEP, PRIORITY_STEPS, QUEUES, queue_lists

ROOT = Path(__file__).resolve().parent.parent


def as_redis_returns(mapping: dict[str, object]) -> dict[bytes, bytes]:
    """What HGETALL gives back for an HSET of `mapping`: redis-py's own encoding of each value, as bytes."""
    encoder = RedisEncoder("utf-8", "strict", False)
    return {key.encode(): bytes(encoder.encode(value)) for key, value in mapping.items()}  # type: ignore[arg-type]


# -- the job record ------------------------------------------------------------------------------


def test_a_job_record_written_at_start_reads_back_with_its_types() -> None:
    # given the record a job writes when it starts
    written = JobRecord("in.jsonl", "out.npy", "tiny", job_record.RUNNING, 1000.5, 1000, 100)
    # when it goes through Redis (every value a string) and back
    read = JobRecord.from_hash(as_redis_returns(written.to_hash()))
    # then every field has its value and type again, and the outcome is still unknown
    assert read == written
    assert isinstance(read.started, float) and isinstance(read.chunk_rows, int)
    assert (read.rows, read.chunks, read.wall_s, read.failures) == (None, None, None, None)


def test_the_counters_the_job_increments_are_fields_of_the_record() -> None:
    names = set(JobRecord.__dataclass_fields__)
    assert {job_record.SENT_CHUNKS, job_record.DONE_CHUNKS, job_record.FAILED_CHUNKS} <= names
    assert set(JobRecord.end_fields(state="done", rows=1, chunks=1, wall_s=1.0, failures=0)) <= names


def test_a_finished_job_reads_as_its_outcome_and_status_reports_it() -> None:
    # given a record written at the start, counters incremented, then the outcome written over it
    start = JobRecord("in.jsonl", "out.npy", "tiny", job_record.RUNNING, 1000.0, 1000, 100).to_hash()
    counters = {job_record.SENT_CHUNKS: 10, job_record.DONE_CHUNKS: 9, job_record.FAILED_CHUNKS: 1}
    end = JobRecord.end_fields(state=job_record.FAILED, rows=1000, chunks=10, wall_s=12.3456, failures=1)
    record = JobRecord.from_hash(as_redis_returns({**start, **counters, **end}))
    # then the record has the outcome, and `embedq status` turns it into documents
    assert (record.state, record.rows, record.chunks, record.wall_s, record.failures) == ("failed", 1000, 10, 12.346, 1)
    status = job_status("j", record)
    assert (status.done_chunks, status.total_chunks, status.docs_done, status.failures) == (9, 10, 900, 1)


def test_an_unreadable_field_keeps_its_default_instead_of_failing_status() -> None:
    record = JobRecord.from_hash({b"state": b"running", b"done_chunks": b"many", b"started": b"1.5"})
    assert (record.state, record.done_chunks, record.started) == ("running", 0, 1.5)


# -- chunk events --------------------------------------------------------------------------------

DONE: events.ChunkDone = {
    "type": "done",
    "attempt": 0,
    "chunk": 3,
    "rows": 4,
    "dim": 32,
    "tokens": 40,
    "padded_tokens": 48,
    "truncated": 0,
    "batches": 1,
    "dtype": "fp32",
    "ms": 12.5,
    "worker": "host:123",
}
FAILED: events.ChunkFailed = {"type": "failed", "chunk": 2, "reason": "boom", "quarantined": True, "worker": "h"}


@pytest.mark.parametrize("event", [DONE, {**DONE, "emulated": True}, FAILED], ids=["done", "done-emulated", "failed"])
def test_both_chunk_events_survive_the_wire(event: events.ChunkEvent) -> None:
    assert events.parse(json.dumps(event).encode()) == event


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**DONE, "rows": "4"}, "field 'rows' must be int"),
        ({k: v for k, v in DONE.items() if k != "dtype"}, "field 'dtype' must be str"),
        ({**FAILED, "quarantined": 1}, "field 'quarantined' must be bool"),
        ({**DONE, "emulated": "yes"}, "field 'emulated' must be bool"),
        ({**DONE, "type": "started"}, "'type' must be one of done, failed"),
        ([1, 2], "'type' must be one of"),
    ],
)
def test_an_event_of_another_shape_is_refused_naming_the_field(raw: object, message: str) -> None:
    with pytest.raises(events.BadEvent, match=message):
        events.parse(json.dumps(raw))


def test_an_event_that_is_not_json_is_refused() -> None:
    with pytest.raises(events.BadEvent, match="not JSON"):
        events.parse(b"{nope")


# -- queues and keys -----------------------------------------------------------------------------


def test_queue_lists_are_where_kombu_keeps_each_priority_step() -> None:
    # given kombu's own naming of a queue's list per priority (kombu.transport.redis.Channel._q_for_pri)
    channel = types.SimpleNamespace(sep=kombu_redis.Channel.sep, priority_steps=kombu_redis.PRIORITY_STEPS)
    channel.priority = lambda n: kombu_redis.Channel.priority(channel, n)
    # and the prefix Celery puts on every key (embedq's global_keyprefix)
    settings = Settings(key_prefix="tenant")
    prefix = celery_config(settings)["broker_transport_options"]["global_keyprefix"]
    # then embedq counts exactly those lists
    assert (list(PRIORITY_STEPS), PRIORITY_SEP) == (kombu_redis.PRIORITY_STEPS, kombu_redis.Channel.sep)
    for queue in QUEUES:
        kombus = [prefix + kombu_redis.Channel._q_for_pri(channel, queue, step) for step in PRIORITY_STEPS]
        assert queue_lists(Keys("tenant"), queue) == kombus


def test_celery_declares_the_queues_in_priority_order() -> None:
    declared = [queue.name for queue in celery_config(Settings())["task_queues"]]
    assert declared == list(QUEUES) == ["interactive", "bulk"]


def test_every_key_is_under_the_prefix_and_no_two_kinds_collide() -> None:
    keys = Keys("p")
    names = [
        keys.result("j", 1),
        keys.events("j"),
        keys.deliveries("j"),
        keys.job("j"),
        keys.jobs(),
        keys.stats(),
        keys.models(),
        keys.cache("ns", "digest"),
        keys.unacked(),
        *(keys.queue(queue) for queue in QUEUES),
    ]
    assert all(name.startswith("p:") for name in names)
    assert len({name.split(":")[1] for name in names}) == len(names)  # one second segment per kind


def test_a_messages_lane_is_read_from_before_the_model_suffix() -> None:
    from workers.protocol.deadlines import lane_of

    # a model whose name contains "interactive", on the bulk lane, is counted on the bulk lane
    assert lane_of("bulk.interactive-search") == "bulk"
    assert lane_of("interactive.mini-32") == "interactive" and lane_of("interactive") == "interactive"
    assert lane_of(None) == "bulk"
