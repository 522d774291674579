"""One embedding job: read -> chunk -> send (bounded in flight) -> collect -> write at row offsets.

Delivery underneath is at-least-once at best; the output is exact because every chunk is written
at its own offset once, duplicates are ignored, and expected chunks are reconciled against the
ones received (a chunk that goes silent is sent again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import kombu.exceptions
import redis

from producer.job import record as job_record
from producer.job.broker import sender_app
from producer.job.chunk_plan import ChunkPlan
from producer.job.dispatcher import RESULT_VANISHED, Dispatcher
from producer.job.output import ChunkRecord, PartialOutput
from producer.job.progress import Progress
from producer.job.readers import Record, Rejected, count_lines, read_records
from producer.job.spec import JobOptions, JobReport, job_id_for
from producer.job.window_output import open_partial, unsupported
from workers.protocol import events
from workers.protocol.config import Settings
from workers.protocol.errors import BrokerUnavailable, InputError, JobFailed
from workers.protocol.keys import Keys, connect
from workers.protocol.long_docs import CHUNKS, TRUNCATE
from workers.protocol.queues import queue_depth
from workers.protocol.store import ResultStore, open_store

log = logging.getLogger("embedq.producer")


def _record(chunk: int, start: int, rows: int, event: dict[str, Any]) -> ChunkRecord:
    """The resume log's record of a done chunk of `rows` documents starting at row `start`."""
    return ChunkRecord(
        chunk,
        start,
        rows,
        int(event["tokens"]),
        int(event["padded_tokens"]),
        int(event["truncated"]),
        str(event["dtype"]),
        int(event.get("split", 0)),
        int(event.get("windows", 0)),
    )


@dataclass
class _Chunk:
    index: int
    start: int
    texts: list[str]


class Job:
    """Runs one corpus job against a broker; `run()` returns a JobReport or raises."""

    def __init__(
        self,
        input_path: str,
        output: str,
        options: JobOptions,
        settings: Settings,
        *,
        progress: bool | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.input_path = input_path
        self.output = output
        self.options = options
        self.settings = settings
        #: Called about once a second while waiting (the embedded cluster checks its workers there).
        self.on_idle = on_idle
        self.keys = Keys(settings.key_prefix)
        self.job_id = job_id_for(input_path, output, options)
        self.report = JobReport(self.job_id)
        self.redis = connect(settings.broker_url)
        self.store: ResultStore = open_store(
            options.results, redis_url=settings.results_url, key_prefix=settings.key_prefix, ttl_s=settings.result_ttl_s
        )
        self.app = sender_app(settings)
        self.dispatcher = Dispatcher(
            self.app,
            self.redis,
            self.keys,
            self.job_id,
            options,
            lease_ttl_s=settings.lease_ttl_s,
            with_broker=self._with_broker,
            queue_depth=lambda: queue_depth(self.redis, self.keys, options.queue),
        )
        self.pending = self.dispatcher.pending
        self.total_hint = count_lines(input_path, options.input_format)
        self.plan = ChunkPlan(options.chunk_rows, self.total_hint, options.tail_split, options.min_chunk_rows)
        self.progress = Progress(self.total_hint, enabled=progress)
        #: Whether this job already said that a worker runs bf16 emulated (said once, not per chunk).
        self._said_emulated = False

    # -- reading -------------------------------------------------------------------------------

    def _chunks(self, partial: PartialOutput) -> Iterator[_Chunk]:
        texts: list[str] = []
        start = rows = index = 0
        size = self.plan.size(0)
        for item in read_records(
            self.input_path,
            fmt=self.options.input_format,
            text_field=self.options.text_field,
            id_field=self.options.id_field,
        ):
            if isinstance(item, Rejected):
                if self.options.on_invalid == "fail":
                    raise InputError(
                        f"{item.reason} (use --on-invalid skip to set such records aside)",
                        source=self.input_path,
                        line=item.line,
                    )
                self.report.rejected += 1
                partial.add_reject(self.input_path, item.line, item.reason, item.raw)
                continue
            assert isinstance(item, Record)
            partial.add_id(item.id)
            texts.append(item.text)
            rows += 1
            if len(texts) == size:
                yield _Chunk(index, start, texts)
                size = self.plan.size(rows)
                index, start, texts = index + 1, rows, []
        if texts:
            yield _Chunk(index, start, texts)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> JobReport:
        started = time.monotonic()
        partial = open_partial(
            self.output, self.options.output_dim, self.job_id, self.options.long, self.options.precision
        )
        self._record_job_start()
        earlier = self._earlier_results(partial)
        try:
            for chunk in self._chunks(partial):
                self.report.chunks += 1
                self.report.rows = chunk.start + len(chunk.texts)
                if chunk.index in partial.finished:
                    self._count_finished(partial.finished[chunk.index], reused=True)
                    continue
                if chunk.index in earlier and self._adopt(partial, chunk, earlier.pop(chunk.index)):
                    continue
                while len(self.pending) >= self.options.max_in_flight:
                    self._collect(partial)
                self.dispatcher.send(chunk.index, chunk.start, chunk.texts)
            self.dispatcher.all_sent = True
            while self.pending:
                self._collect(partial)
            self.report.wall_s = time.monotonic() - started
            self.report.failures = self.dispatcher.failures
            self._count_resends()
            self.progress.close()
            if self.report.failures:
                self._record_job_end(job_record.FAILED)
                raise JobFailed(self._failure_summary())
            partial.finish(self.report.rows, self._manifest())
            self._record_job_end(job_record.DONE)
            return self.report
        except BaseException as error:
            self.progress.close()
            partial.close()
            if isinstance(error, JobFailed):
                self._record_job_end(job_record.FAILED)
            # Invalid input is final: a rerun needs a fixed input (a new job), so nothing is worth keeping.
            # Other stops (Ctrl-C, broker lost) keep finished chunks for a rerun to reuse.
            if isinstance(error, InputError) or not partial.finished:
                partial.discard()
            self._forget_pending()
            raise
        finally:
            self._cleanup_keys()

    def _collect(self, partial: PartialOutput) -> None:
        """Wait up to a second for one event; reconcile silent chunks when there is none."""
        event = self._with_broker(lambda: events.pop(self.redis, self.keys, self.job_id, timeout_s=1.0))
        if event is None and self.on_idle is not None:
            self.on_idle()
        # Leases, the fleet and Redis are looked at about once a second, events or not.
        self.dispatcher.tick(total_chunks=self.report.chunks if self.dispatcher.all_sent else None)
        if event is None:
            return
        self.dispatcher.heard()
        chunk = int(event["chunk"])
        pending = self.pending.get(chunk)
        if pending is None:
            # A duplicate (the chunk ran twice) or a chunk of an earlier run: already written.
            if event.get("type") == "done" and chunk in partial.finished:
                self.store.delete(self.job_id, chunk)
            return
        if event["type"] == "failed":
            self.dispatcher.fail(chunk, event.get("reason", "unknown"), quarantined=bool(event.get("quarantined")))
            self._with_broker(lambda: self.redis.hincrby(self.keys.job(self.job_id), job_record.FAILED_CHUNKS, 1))
            return
        stored = self._with_broker(lambda: self.store.get_chunk(self.job_id, chunk))
        if stored is None:
            # Lost between the event and now (Redis restarted empty, evicted, expired): compute it again.
            self.dispatcher.resend(
                pending,
                RESULT_VANISHED,
                "its result vanished after it was reported done (Redis restarted "
                "empty, or the key expired or was evicted: raise EMBEDQ_RESULT_TTL_S, use noeviction)",
            )
            return
        why = unsupported(self.options.long, dict(event), stored.windows)
        if why:
            self.dispatcher.fail(chunk, why)
            self._with_broker(lambda: self.store.delete(self.job_id, chunk))
            return
        record = _record(chunk, pending.start, int(event["rows"]), dict(event))
        if event.get("emulated") and not self._said_emulated:
            self._said_emulated = True
            log.warning("worker %s: %s", event["worker"], events.EMULATED_BF16)
        partial.write_chunk(record, stored.array, stored.windows)
        self._settle(chunk, count_done=True)
        self.dispatcher.collected(chunk, float(event.get("ms", 0.0)))
        self._count_finished(record, reused=False)

    def _settle(self, chunk: int, *, count_done: bool = False) -> None:
        """First result wins: mark the chunk collected, then delete its result.

        In that order: a later copy checks the mark after its own write (workers/tasks.py) and deletes
        what it wrote, so whichever way the two interleave, no result key outlives the job.
        `count_done` adds the job record's done counter to the mark's round trip.
        """

        def mark() -> None:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.sadd(self.keys.collected(self.job_id), str(chunk))
                pipe.expire(self.keys.collected(self.job_id), events.EVENTS_TTL_S)
                if count_done:
                    pipe.hincrby(self.keys.job(self.job_id), job_record.DONE_CHUNKS, 1)
                pipe.execute()

        self._with_broker(mark)
        self._with_broker(lambda: self.store.delete(self.job_id, chunk))

    def _earlier_results(self, partial: PartialOutput) -> dict[int, dict[str, Any]]:
        """Done events of chunks an earlier run of this job sent but never collected (it was killed)."""
        raw = self._with_broker(lambda: self.redis.lrange(self.keys.events(self.job_id), 0, -1))
        found: dict[int, dict[str, Any]] = {}
        for item in raw:
            event = json.loads(item)
            if event.get("type") == "done" and int(event["chunk"]) not in partial.finished:
                found[int(event["chunk"])] = event
        return found

    def _adopt(self, partial: PartialOutput, chunk: _Chunk, event: dict[str, Any]) -> bool:
        """Write a chunk an earlier run left computed in the store; False when it is gone or does not match."""
        stored = self._with_broker(lambda: self.store.get_chunk(self.job_id, chunk.index))
        if stored is None or int(event["rows"]) != len(chunk.texts):
            return False
        if unsupported(self.options.long, event, stored.windows):
            return False
        record = _record(chunk.index, chunk.start, len(chunk.texts), event)
        if stored.array.shape[0] != partial.rows_of(record):
            return False
        partial.write_chunk(record, stored.array, stored.windows)
        self._settle(chunk.index)
        self._count_finished(record, reused=True)
        return True

    def _count_finished(self, record: ChunkRecord, *, reused: bool) -> None:
        self.report.tokens += record.tokens
        self.report.padded_tokens += record.padded_tokens
        self.report.truncated += record.truncated
        self.report.split += record.split
        self.report.windows += record.windows
        self.report.dtypes.add(record.dtype)
        if reused:
            self.report.reused_chunks += 1
        self.progress.update(record.rows)

    # -- broker trouble ------------------------------------------------------------------------

    def _with_broker(self, action: Callable[[], Any]) -> Any:
        """Run `action`, retrying while the broker is briefly away (a restart), up to broker_retry_s."""
        deadline = time.monotonic() + self.options.broker_retry_s
        delay = 0.2
        while True:
            try:
                return action()
            except (
                redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError,
                OSError,
                kombu.exceptions.OperationalError,
            ) as error:
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(
                        f"lost the broker for {self.options.broker_retry_s:.0f} s: {error}"
                    ) from error
                log.warning("broker unreachable (%s); retrying", error)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _record_job_start(self) -> None:
        key = self.keys.job(self.job_id)
        self._with_broker(
            lambda: self.redis.hset(
                key,
                # A rerun counts afresh: the counters start at 0 again.
                mapping=job_record.JobRecord(
                    input=self.input_path,
                    output=self.output,
                    model=self.options.model.name,
                    state=job_record.RUNNING,
                    started=time.time(),
                    total_hint=self.total_hint or 0,
                    chunk_rows=self.options.chunk_rows,
                    tail_split=self.options.tail_split,
                    min_chunk_rows=self.options.min_chunk_rows,
                ).to_hash(),
            )
        )
        self.redis.zadd(self.keys.jobs(), {self.job_id: time.time()})

    def _record_job_end(self, state: str) -> None:
        try:
            self.redis.hset(
                self.keys.job(self.job_id),
                mapping=job_record.JobRecord.end_fields(
                    state=state,
                    rows=self.report.rows,
                    chunks=self.report.chunks,
                    wall_s=self.report.wall_s,
                    failures=len(self.report.failures),
                ),
            )
            self.redis.expire(self.keys.job(self.job_id), events.EVENTS_TTL_S)
        except (redis.exceptions.RedisError, OSError):
            pass

    def _forget_pending(self) -> None:
        for index in list(self.pending):
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                self.store.delete(self.job_id, index)

    def _count_resends(self) -> None:
        self.report.resent_by_reason = dict(self.dispatcher.resent)
        self.report.resent_chunks = sum(self.dispatcher.resent.values())

    def _cleanup_keys(self) -> None:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            self.redis.delete(self.keys.events(self.job_id), self.keys.deliveries(self.job_id))

    def _failure_summary(self) -> str:
        failures = sorted(self.report.failures, key=lambda f: f["chunk"])
        parts = [
            f"rows {f['rows'][0]}-{f['rows'][1] - 1} ({'quarantined: ' if f['quarantined'] else ''}{f['reason']})"
            for f in failures[:5]
        ]
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        return f"{len(failures)} of {self.report.chunks} chunks failed, output not written: {'; '.join(parts)}{more}"

    def _long_fields(self) -> dict[str, Any]:
        """The long-document policy, how many documents it split and into how many windows (and under
        `chunks`, the rows of the output)."""
        fields: dict[str, Any] = {"long": self.options.long, "split_docs": self.report.split}
        if self.options.long != TRUNCATE:
            fields["split_windows"] = self.report.windows
        if self.options.long == CHUNKS:
            fields["window_rows"] = self.report.rows - self.report.split + self.report.windows
        return fields

    def _manifest(self) -> dict[str, Any]:
        report = self.report
        return {
            "job": self.job_id,
            "input": self.input_path,
            "output": self.output,
            "model": self.options.model.name,
            "model_path": self.options.model.path,
            "dim": self.options.output_dim,
            "pooling": self.options.model.pooling,
            "max_length": self.options.model.max_length,
            "normalize": self.options.normalize,
            "prompt_name": self.options.prompt_name,
            "prompt": self.options.prompt,
            "dimensions": self.options.dimensions,
            "dtype": ",".join(sorted(report.dtypes)) or self.options.dtype,
            "rows": report.rows,
            "chunks": report.chunks,
            "chunk_rows": self.options.chunk_rows,
            "reused_chunks": report.reused_chunks,
            "resent_chunks": report.resent_chunks,
            "resent_by_reason": report.resent_by_reason,
            "tokens": report.tokens,
            "padded_tokens": report.padded_tokens,
            "truncated": report.truncated,
            **self._long_fields(),
            "rejected": report.rejected,
            "wall_s": round(report.wall_s, 3),
            "docs_per_s": round(report.docs_per_s, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
