"""The dispatcher owns a job's send policy: first sends, re-sends of lost chunks, and backup copies.

Delivery underneath is at-least-once at best (see ARCHITECTURE.md on kombu's unacked sweep), so the
dispatcher never waits on Redis' visibility timeout. It watches, about once a second:
- the lease of every copy it is waiting for (workers/lease.py): a lease that vanishes without a
  result means its holder went silent (host lost, link cut, VM frozen), and the chunk is sent again
  as a new attempt, about `lease_ttl_s` after the holder's last renewal;
- a chunk that nobody has started although the queue is empty (taken by a host that died at once);
- at the tail, a chunk still running well past the typical chunk time while nothing is left to send:
  a backup copy goes to the rest of the fleet, and the first result wins (Spark's speculation);
- Redis' run id (a restart may have emptied the queues) and total silence (`stall_timeout_s`);
- the fleet itself: no live worker for `workers_lost_s` ends the job, naming the rows not embedded.
Every re-send is counted by reason, in the job report and in the fleet counters for /metrics.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from celery import Celery

from producer.job import record as job_record
from producer.job.broker import send_chunk, task_id_for
from producer.job.spec import JobOptions
from workers.protocol import events
from workers.protocol.config import LEASE_RENEWALS_PER_TTL
from workers.protocol.errors import JobFailed
from workers.protocol.keys import Keys
from workers.protocol.liveness import live_workers

log = logging.getLogger("embedq.producer")

#: Why a chunk was sent again: the label of `embedq_chunks_resent_total{reason=...}`.
HOLDER_SILENT = "holder_silent"
STRAGGLER_BACKUP = "straggler_backup"
REDIS_RESTARTED = "redis_restarted"
STALL = "stall"
RESULT_VANISHED = "result_vanished"
assert set(events.RESEND_REASONS) == {HOLDER_SILENT, STRAGGLER_BACKUP, REDIS_RESTARTED, STALL, RESULT_VANISHED}

#: Backups start once this share of the job's chunks is done (Spark: 75% before 4.0, 90% since) ...
SPECULATION_QUANTILE = 0.75
#: ... for a chunk running this many times the median chunk time (Spark: 1.5 before 4.0, 3 since) ...
SPECULATION_MULTIPLIER = 1.5
#: ... and at least this much longer than the median, so tiny chunks do not back each other up.
SPECULATION_MIN_EXTRA_S = 1.0
#: A copy that nobody started while the queue stood empty this many lease lifetimes was taken by a
#: worker that died before it could start it.
UNSTARTED_TTLS = 3
TICK_S = 1.0


def straggler_threshold_s(median_s: float) -> float:
    """Seconds after which a chunk whose size typically takes `median_s` gets a backup copy."""
    return max(SPECULATION_MULTIPLIER * median_s, median_s + SPECULATION_MIN_EXTRA_S)


@dataclass
class Holding:
    """A copy's lease as the producer sees it: since when its current holder runs it, and whether it is renewed."""

    #: When the producer first saw this holder's lease (a redelivery to a new child starts a new holding).
    seen: float
    record: dict[str, Any]
    #: When the producer last saw the renewal count rise (or the holder appear).
    renewed: float

    def update(self, now: float, record: dict[str, Any]) -> Holding:
        """The holding after reading `record`: the same holder renewing, or a new one starting the copy again."""
        if (record.get("pid"), record.get("started")) != (self.record.get("pid"), self.record.get("started")):
            return Holding(seen=now, record=record, renewed=now)
        renewed = now if record.get("renewals") != self.record.get("renewals") else self.renewed
        return Holding(seen=self.seen, record=record, renewed=renewed)

    def renewing(self, now: float, interval_s: float) -> bool:
        """True when its holder has renewed at least once and not missed much more than one renewal since:
        it is alive and working. A child that died on the chunk (a poison text, the OOM killer) never
        renews, and neither does a frozen one: neither is a straggler a backup copy could overtake."""
        return int(self.record.get("renewals") or 0) > 0 and now - self.renewed <= 2 * interval_s


@dataclass
class Pending:
    """A chunk sent and not yet collected, with every copy (attempt) of it that may still be running."""

    index: int
    start: int
    texts: list[str]
    sent_at: float
    sends: int = 1
    #: attempt -> when its copy was sent
    attempts: dict[int, float] = field(default_factory=dict)
    #: attempt -> its lease as last seen, while it is seen
    held: dict[int, Holding] = field(default_factory=dict)
    backup: bool = False
    #: attempt -> when its lease was found gone while its worker main process still looked alive
    suspect: dict[int, float] = field(default_factory=dict)

    @property
    def rows(self) -> list[int]:
        return [self.start, self.start + len(self.texts)]


class Dispatcher:
    """Sends a job's chunks and decides, once a second, which ones to send again and why."""

    def __init__(
        self,
        app: Celery,
        client: redis.Redis,
        keys: Keys,
        job_id: str,
        options: JobOptions,
        *,
        lease_ttl_s: float,
        with_broker: Callable[[Callable[[], Any]], Any],
        queue_depth: Callable[[], int],
    ) -> None:
        self.app = app
        self.redis = client
        self.keys = keys
        self.job_id = job_id
        self.options = options
        self.task_options = options.task_options()
        self.lease_ttl_s = lease_ttl_s
        self._with_broker = with_broker
        self._queue_depth = queue_depth
        self.pending: dict[int, Pending] = {}
        self.resent: Counter[str] = Counter()
        #: Chunks that failed for good: dicts of chunk, rows, reason, quarantined.
        self.failures: list[dict[str, Any]] = []
        self.done_ms: list[float] = []
        #: Milliseconds per row of each collected chunk: tail chunks are smaller (producer/job/chunk_plan.py), so
        #: the straggler rule compares a chunk with the typical time for its own number of rows.
        self.done_ms_per_row: list[float] = []
        self.all_sent = False
        self.chunks_done = 0
        self._next_tick = 0.0
        self._last_news = time.monotonic()
        self._last_worker_seen = time.monotonic()
        self._run_id = self._server_run_id()

    # -- sending -------------------------------------------------------------------------------

    def send(self, index: int, start: int, texts: list[str]) -> None:
        """The first send of a chunk."""
        now = time.monotonic()
        self.pending[index] = Pending(index, start, texts, now)
        self._send_copy(self.pending[index])

    def _send_copy(self, pending: Pending) -> None:
        attempt = max(pending.attempts, default=-1) + 1
        self._with_broker(
            lambda: send_chunk(
                self.app,
                self.job_id,
                pending.index,
                pending.texts,
                self.task_options,
                queue=self.options.queue,
                attempt=attempt,
            )
        )
        pending.attempts[attempt] = pending.sent_at = time.monotonic()

        def bookkeeping() -> None:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(self.keys.job(self.job_id), job_record.SENT_CHUNKS, 1)
                pipe.hincrby(self.keys.sends(self.job_id), str(pending.index), 1)
                pipe.expire(self.keys.sends(self.job_id), events.EVENTS_TTL_S)
                pipe.execute()

        self._with_broker(bookkeeping)

    def resend(self, pending: Pending, reason: str, why: str) -> None:
        """Send another copy of a chunk, or record it as failed once it has been sent max_sends times.

        Backups do not count towards max_sends: they answer slowness, not loss.
        """
        if reason != STRAGGLER_BACKUP:
            if pending.sends >= self.options.max_sends:
                self.fail(pending.index, f"{why}; gave up after {pending.sends} sends")
                return
            pending.sends += 1
        else:
            pending.backup = True
        log.warning("sending chunk %d (rows %d-%d) again: %s", pending.index, pending.start, pending.rows[1] - 1, why)
        self.resent[reason] += 1
        self._with_broker(lambda: self.redis.hincrby(self.keys.stats(), f"resent_{reason}", 1))
        self._send_copy(pending)

    def fail(self, index: int, reason: str, *, quarantined: bool = False) -> None:
        pending = self.pending.pop(index)
        self.failures.append({"chunk": index, "rows": pending.rows, "reason": reason, "quarantined": quarantined})

    def collected(self, index: int, ms: float) -> Pending:
        """A chunk's first result is written: forget it, and remember its time for the straggler rule."""
        self.chunks_done += 1
        pending = self.pending.pop(index)
        self.done_ms.append(ms)
        self.done_ms_per_row.append(ms / max(1, len(pending.texts)))
        self._last_news = time.monotonic()
        return pending

    def heard(self) -> None:
        self._last_news = time.monotonic()

    # -- watching ------------------------------------------------------------------------------

    def tick(self, *, total_chunks: int | None = None) -> None:
        """At most once a second: look at leases, the fleet and Redis, and send again what is lost."""
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + TICK_S
        if self._redis_restarted():
            for pending in list(self.pending.values()):
                self.resend(
                    pending, REDIS_RESTARTED, "Redis restarted (its run_id changed): queued messages may be gone"
                )
            return
        if self.pending:
            # One read of the fleet per tick serves both rules below; the job only counts on the workers that
            # consume its model's queue (a fleet serving other models cannot finish it).
            records = self._with_broker(lambda: live_workers(self.redis, self.keys))
            alive = {str(w.get("hostname")) for w in records}
            serving = {str(w.get("hostname")) for w in records if self.options.queue in (w.get("queues") or [])}
            self._watch_leases(now, total_chunks, alive)
            self._watch_fleet(now, serving)
        if now - self._last_news >= self.options.stall_timeout_s:
            for pending in list(self.pending.values()):
                if now - pending.sent_at >= self.options.stall_timeout_s:
                    self.resend(
                        pending,
                        STALL,
                        f"no worker finished it within --stall-timeout {self.options.stall_timeout_s:.0f} s",
                    )
            self._last_news = now

    def _watch_leases(self, now: float, total_chunks: int | None, alive: set[str]) -> None:
        copies = [(p, attempt) for p in self.pending.values() for attempt in p.attempts]
        names = [self.keys.lease(self.job_id, p.index, attempt) for p, attempt in copies]
        raw = cast("list[bytes | None]", self._with_broker(lambda: self.redis.mget(names)))
        waiting = None  # chunks with an event not yet popped: fetched only when needed
        queue_empty: bool | None = None
        for (pending, attempt), value in zip(copies, raw, strict=True):
            if value is not None:
                record = json.loads(value)
                holding = pending.held.get(attempt)
                pending.held[attempt] = holding.update(now, record) if holding else Holding(now, record, now)
                pending.suspect.pop(attempt, None)
                continue
            if attempt in pending.held:
                # Its holder stopped renewing: gone, unless it finished and its event is on the way.
                waiting = self._chunks_with_events() if waiting is None else waiting
                if pending.index in waiting:
                    continue
                holder = pending.held[attempt].record
                # A pool child that died on a live worker is requeued by Celery itself (reject on worker
                # lost) and counted towards quarantine: wait for that, unless the worker goes too, or the
                # copy stays unheld for two lease lifetimes (a child hung without the GIL).
                since = pending.suspect.setdefault(attempt, now)
                if holder.get("worker") in alive and now - since < 2 * self.lease_ttl_s:
                    continue
                pending.held.pop(attempt)
                pending.suspect.pop(attempt, None)
                del pending.attempts[attempt]
                if not pending.held:
                    self.resend(
                        pending,
                        HOLDER_SILENT,
                        f"its holder {holder.get('worker') or holder.get('host', '?')} (attempt {attempt}) went silent "
                        f"for {self.lease_ttl_s:g} s",
                    )
            elif now - pending.attempts[attempt] >= UNSTARTED_TTLS * self.lease_ttl_s and not pending.held:
                queue_empty = (self._with_broker(self._queue_depth) == 0) if queue_empty is None else queue_empty
                waiting = self._chunks_with_events() if waiting is None else waiting
                if queue_empty and pending.index not in waiting:
                    del pending.attempts[attempt]
                    self.resend(
                        pending,
                        HOLDER_SILENT,
                        f"attempt {attempt} left the queue {now - pending.sent_at:.0f} s ago and never started "
                        "(its worker died before it could)",
                    )
        self._speculate(now, total_chunks)

    def _speculate(self, now: float, total_chunks: int | None) -> None:
        """Backup copies of stragglers once nothing is left to send and most chunks are done."""
        if not self.all_sent or not self.done_ms or total_chunks is None:
            return
        if self.chunks_done < SPECULATION_QUANTILE * total_chunks:
            return
        per_row_s = statistics.median(self.done_ms_per_row) / 1000.0
        renewal_s = self.lease_ttl_s / LEASE_RENEWALS_PER_TTL
        for pending in list(self.pending.values()):
            renewing = [h for h in pending.held.values() if h.renewing(now, renewal_s)]
            if pending.backup or not renewing:
                continue
            median_s = per_row_s * len(pending.texts)  # the typical time of a chunk of this size
            threshold_s = straggler_threshold_s(median_s)
            running_s = now - min(h.seen for h in renewing)
            if running_s > threshold_s and not self._crashed_before(pending):
                self.resend(
                    pending,
                    STRAGGLER_BACKUP,
                    f"still running after {running_s:.1f} s, {running_s / median_s if median_s else 0:.1f}x the "
                    f"median time of a chunk of its size ({median_s:.2f} s): a backup copy goes to the rest of the "
                    "fleet",
                )

    def _watch_fleet(self, now: float, alive: set[str]) -> None:
        if alive:
            self._last_worker_seen = now
            return
        silent_s = now - self._last_worker_seen
        if silent_s < self.options.workers_lost_s:
            return
        rows = ", ".join(f"{p.rows[0]}-{p.rows[1] - 1}" for p in sorted(self.pending.values(), key=lambda p: p.index))
        raise JobFailed(
            f"no live worker serving model {self.options.model.name} for {silent_s:.0f} s "
            f"(--workers-lost-timeout {self.options.workers_lost_s:g} s): "
            f"{len(self.pending)} chunk(s) not embedded, rows {rows}; start workers on this broker and run the same "
            "command again to resume"
        )

    def _crashed_before(self, pending: Pending) -> bool:
        """True when a copy of this chunk was started more than once: its children die on it (a poison
        text, the OOM killer), it is not slow, and a backup would only kill another child."""
        # Fields as workers/tasks.py delivery_field writes them, for the first try of each copy.
        fields = [f"{pending.index}:{task_id_for(self.job_id, pending.index, a)}:0" for a in pending.attempts]
        counts = self._with_broker(lambda: self.redis.hmget(self.keys.deliveries(self.job_id), fields))
        return any(int(count or 0) > 1 for count in counts)

    def _chunks_with_events(self) -> set[int]:
        raw = cast("list[bytes]", self._with_broker(lambda: self.redis.lrange(self.keys.events(self.job_id), 0, -1)))
        return {int(json.loads(item)["chunk"]) for item in raw}

    def _redis_restarted(self) -> bool:
        run_id = self._server_run_id()
        restarted = run_id is not None and self._run_id is not None and run_id != self._run_id
        if run_id is not None:
            self._run_id = run_id
        return restarted

    def _server_run_id(self) -> str | None:
        try:
            info = self.redis.info("server")
        except (redis.exceptions.RedisError, OSError):
            return None
        run_id = info.get("run_id")
        return str(run_id) if run_id else None
