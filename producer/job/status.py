"""`embedq status [JOB]`: progress of running and finished corpus jobs, read from the broker.

Each job keeps a record (`Keys.job`, fields in producer/job/record.py) that producer/job/runner.py updates
as chunks are sent and collected, and the sorted set `Keys.jobs()` orders jobs by start time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import cast

import redis

from producer.job.chunk_plan import MIN_TAIL_ROWS, ChunkPlan
from producer.job.record import DONE, FAILED, RUNNING, JobRecord
from workers.protocol.keys import Keys


@dataclass(frozen=True)
class JobStatus:
    """One job's progress, in the units an operator asks about."""

    job: str
    state: str
    input: str
    done_chunks: int
    total_chunks: int | None
    docs_done: int
    docs_total: int | None
    failures: int
    elapsed_s: float

    @property
    def docs_per_s(self) -> float:
        return self.docs_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.state != RUNNING or not self.docs_total or self.docs_per_s <= 0:
            return None
        return max(0.0, (self.docs_total - self.docs_done) / self.docs_per_s)


def job_status(job: str, record: JobRecord, now: float | None = None) -> JobStatus:
    """Progress from a job record; totals of a running job are estimated from the input's line count."""
    now = time.time() if now is None else now
    state, chunk_rows, done = record.state, record.chunk_rows, record.done_chunks
    if state in (DONE, FAILED) and record.chunks is not None:
        total_chunks: int | None = record.chunks
        docs_total: int | None = record.rows or 0
        docs_done = (docs_total or 0) if state == DONE else min(docs_total or 0, done * chunk_rows)
        elapsed = record.wall_s or 0.0
    else:
        hint = record.total_hint
        docs_total = hint or None
        min_rows = record.min_chunk_rows or MIN_TAIL_ROWS
        sizes = list(ChunkPlan(chunk_rows, hint, record.tail_split, min_rows).sizes()) if hint and chunk_rows else []
        total_chunks = len(sizes) or None
        # Chunks finish about in order: the first `done` of the plan (full chunks past a known total).
        docs_done = sum(sizes[:done]) + max(0, done - len(sizes)) * chunk_rows if chunk_rows else 0
        if docs_total is not None:
            docs_done = min(docs_done, docs_total)
        elapsed = max(0.0, now - (record.started or now))
    failures = max(record.failed_chunks, record.failures or 0)
    return JobStatus(job, state, record.input, done, total_chunks, docs_done, docs_total, failures, elapsed)


def read_jobs(client: redis.Redis, keys: Keys, job: str | None = None, limit: int = 20) -> list[JobStatus]:
    """The named job, or the `limit` most recent ones (newest first)."""
    ids = [job] if job else [raw.decode() for raw in cast(list[bytes], client.zrevrange(keys.jobs(), 0, limit - 1))]
    found = []
    for job_id in ids:
        raw = cast(dict[bytes, bytes], client.hgetall(keys.job(job_id)))
        if raw:
            found.append(job_status(job_id, JobRecord.from_hash(raw)))
    return found


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def render(statuses: list[JobStatus]) -> str:
    """A fixed-width table: job, state, chunks done/total, docs, docs/s, ETA, failures, input."""
    header = f"{'JOB':<16}  {'STATE':<8}  {'CHUNKS':>11}  {'DOCS':>15}  {'DOCS/S':>8}  {'ETA':>7}  {'FAILED':>6}  INPUT"
    lines = [header]
    for s in statuses:
        chunks = f"{s.done_chunks}/{s.total_chunks if s.total_chunks is not None else '?'}"
        docs = f"{s.docs_done}/{s.docs_total if s.docs_total is not None else '?'}"
        lines.append(
            f"{s.job:<16}  {s.state:<8}  {chunks:>11}  {docs:>15}  {s.docs_per_s:>8.1f}  "
            f"{_eta(s.eta_s):>7}  {s.failures:>6}  {s.input}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class RunningChunk:
    """One copy of a chunk that a pool child holds right now, from its lease (workers/lease.py)."""

    chunk: int
    attempt: int
    worker: str
    host: str
    pid: int
    lease_age_s: float
    renewals: int
    max_gap_ms: int
    sends: int


def running_chunks(client: redis.Redis, keys: Keys, job: str, now: float | None = None) -> list[RunningChunk]:
    """Every live lease of `job`, with how many times the producer sent its chunk, by chunk then attempt."""
    now = time.time() if now is None else now
    names = sorted(cast(list[bytes], list(client.scan_iter(match=keys.leases(job), count=1000))))
    if not names:
        return []
    sends = {k.decode(): int(v) for k, v in cast(dict[bytes, bytes], client.hgetall(keys.sends(job))).items()}
    found = []
    for name, raw in zip(names, cast(list[bytes | None], client.mget(names)), strict=True):
        if raw is None:
            continue  # expired between the scan and the read
        record = json.loads(raw)
        chunk = int(name.decode().rsplit(":", 2)[1])
        found.append(
            RunningChunk(
                chunk,
                int(record.get("attempt", 0)),
                str(record.get("worker", "")),
                str(record.get("host", "?")),
                int(record.get("pid", 0)),
                max(0.0, now - float(record.get("started", now))),
                int(record.get("renewals", 0)),
                int(record.get("max_gap_ms", 0)),
                sends.get(str(chunk), 1),
            )
        )
    return sorted(found, key=lambda r: (r.chunk, r.attempt))


def render_running(chunks: list[RunningChunk]) -> str:
    """Who holds each running chunk: host, pid, lease age and how many times the chunk was sent."""
    if not chunks:
        return "no chunk running right now"
    lines = [f"{'CHUNK':>7}  {'ATTEMPT':>7}  {'HOST':<24}  {'PID':>7}  {'LEASE AGE':>9}  {'SENT':>4}"]
    for c in chunks:
        lines.append(
            f"{c.chunk:>7}  {c.attempt:>7}  {c.host[:24]:<24}  {c.pid:>7}  {c.lease_age_s:>8.1f}s  {c.sends:>4}"
        )
    return "\n".join(lines)
