"""Task bodies, kept thin: context -> encode -> store -> metadata."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Any, cast

import redis
from celery.exceptions import SoftTimeLimitExceeded

from workers import runtime
from workers.app import app
from workers.lease import ChunkLease
from workers.protocol import deadlines, events
from workers.protocol.config import TASK_EMBED_CHUNK
from workers.protocol.errors import EmbedqError, ModelMismatch, is_retryable
from workers.protocol.keys import JOB_ENDED
from workers.protocol.long_docs import TRUNCATE
from workers.protocol.prompts import resolve_prompt

log = logging.getLogger(__name__)
_HOST = socket.gethostname()


def _fail(ctx: runtime.WorkerContext, job: str, chunk: int, reason: str, *, quarantined: bool = False) -> None:
    event: events.ChunkFailed = {
        "type": "failed",
        "chunk": chunk,
        "reason": reason,
        "quarantined": quarantined,
        "worker": _HOST,
    }
    stats = {"chunks_failed": 1, "chunks_quarantined": int(quarantined)}
    events.publish(ctx.coordination, ctx.keys, job, event, stats, model=ctx.model.name)


def delivery_field(chunk: int, task_id: str | None, retries: int | None) -> str:
    """The deliveries-hash field of one message: `chunk:task id:retry`, so counts can be summed per chunk."""
    return f"{chunk}:{task_id or '-'}:{retries or 0}"


def settled(ctx: runtime.WorkerContext, job: str, chunk: int) -> str:
    """Why a copy of (job, chunk) need not run or be stored any more, or "" when it still matters.

    The producer adds a chunk to `Keys.collected` as it writes it, and marks the job done or failed at its
    end: a backup copy, a frozen host that resumes, or a message Redis redelivers an hour later all
    learn here that the first result already won.
    """
    with ctx.coordination.pipeline(transaction=False) as pipe:
        pipe.hget(ctx.keys.job(job), "state")
        pipe.sismember(ctx.keys.collected(job), str(chunk))
        state, collected = pipe.execute()
    if state is not None and state.decode() in JOB_ENDED:
        return f"its job is {state.decode()}"
    return "another copy was collected first" if collected else ""


def _drop(ctx: runtime.WorkerContext, job: str, chunk: int, attempt: int, why: str) -> dict[str, Any]:
    log.warning("job %s chunk %d attempt %d dropped without storing: %s", job, chunk, attempt, why)
    with contextlib.suppress(redis.exceptions.RedisError, OSError):
        ctx.coordination.hincrby(ctx.keys.stats(), "copies_dropped", 1)
    return {"chunk": chunk, "attempt": attempt, "dropped": why}


def _expire(
    task: Any, ctx: runtime.WorkerContext, job: str, chunk: int, attempt: int, late_s: float, options: dict[str, Any]
) -> dict[str, Any]:
    lane = deadlines.lane_of((task.request.delivery_info or {}).get("routing_key"))
    model = str(options.get("model") or ctx.model.name)
    log.info("job %s chunk %d dropped unrun: its deadline passed %.1f s ago", job, chunk, late_s)
    with contextlib.suppress(redis.exceptions.RedisError, OSError):
        ctx.coordination.hincrby(ctx.keys.stats(), deadlines.stats_field(lane, model), 1)
    return {"chunk": chunk, "attempt": attempt, "dropped": f"its deadline passed {late_s:.1f} s ago", "expired": True}


@app.task(name=TASK_EMBED_CHUNK, bind=True, max_retries=5)
def embed_chunk(self: Any, job: str, chunk: int, texts: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """Embed `texts` (chunk `chunk` of job `job`), store the float32 matrix, report small metadata."""
    ctx = runtime.current()
    attempt = int(options.get("attempt", 0))
    late_s = deadlines.seconds_late(options)
    if late_s is not None:  # its caller gave up: nothing to run, store or report
        return _expire(self, ctx, job, chunk, attempt, late_s, options)
    why = settled(ctx, job, chunk)
    if why:
        return _drop(ctx, job, chunk, attempt, why)
    deliveries_key = ctx.keys.deliveries(job)
    # Counted per message: a redelivery after a worker died keeps the task id and the retry number,
    # while a deliberate retry or a resend by the producer is a new message with a fresh count.
    field = delivery_field(chunk, self.request.id, self.request.retries)
    with ctx.coordination.pipeline(transaction=False) as pipe:  # one round trip
        pipe.hincrby(deliveries_key, field, 1)
        pipe.expire(deliveries_key, events.EVENTS_TTL_S)
        started = int(pipe.execute()[0])
    if started > ctx.settings.max_deliveries:
        reason = (
            f"its worker died {started - 1} times while running it "
            "(killed by the out-of-memory killer, a crash, or a text that crashes the model)"
        )
        log.error("job %s chunk %d %s", job, chunk, reason)
        _fail(ctx, job, chunk, reason, quarantined=True)
        return {"chunk": chunk, "quarantined": True}
    worker = f"{_HOST}:{os.getpid()}"
    # The lease names the Celery node (its liveness key) so that the producer can tell a dead child, which
    # Celery requeues itself, from a lost host.
    node = str(self.request.hostname or worker)
    with ChunkLease(
        ctx.coordination, ctx.keys, job, chunk, attempt, ttl_s=ctx.settings.lease_ttl_s, worker=node
    ) as lease:
        meta = _embed_and_store(self, ctx, job, chunk, texts, options, lease)
    if "dropped" not in meta:
        meta["worker"] = worker
        events.publish(
            ctx.coordination, ctx.keys, job, cast(events.ChunkDone, meta), _stats_of(meta), model=ctx.model.name
        )
    return meta


def _embed_and_store(
    task: Any,
    ctx: runtime.WorkerContext,
    job: str,
    chunk: int,
    texts: list[str],
    options: dict[str, Any],
    lease: ChunkLease,
) -> dict[str, Any]:
    """Encode and store under the chunk's lease; a copy whose lease was lost, or that lost the race, is dropped."""
    attempt = int(options.get("attempt", 0))
    t0 = time.perf_counter()
    try:
        wanted = options.get("model")
        if wanted and wanted != ctx.model.name:
            raise ModelMismatch(f"this worker serves model {ctx.model.name!r}, the task asks for {wanted!r}")
        result = ctx.encoder.encode(
            texts,
            pooling=options.get("pooling") or ctx.model.pooling,
            normalize=bool(options.get("normalize", True)),
            max_length=options.get("max_length") or ctx.model.max_length,
            dtype=options.get("dtype") or ctx.settings.dtype,
            batch_tokens=int(options.get("batch_tokens") or ctx.settings.batch_tokens),
            long=options.get("long") or TRUNCATE,
            # Absent from tasks of producers that could not read the model's prompts: its default applies then.
            prompt=resolve_prompt(ctx.model) if options.get("prompt") is None else str(options["prompt"]),
            dimensions=options.get("dimensions"),
        )
        if lease.lost.is_set():
            return _drop(ctx, job, chunk, attempt, "its lease was lost while it ran (another copy was sent)")
        why = settled(ctx, job, chunk)
        if why:
            return _drop(ctx, job, chunk, attempt, why)
        store = ctx.store(options.get("results", "redis"))
        store.put(job, chunk, result.embeddings, windows=result.window_table)
        # Checked again after the write: the producer collects (deletes the key, then marks the chunk) in one
        # transaction, so a copy that lost the race between the two checks removes what it just wrote.
        why = settled(ctx, job, chunk)
        if why:
            store.delete(job, chunk)
            return _drop(ctx, job, chunk, attempt, why)
    except SoftTimeLimitExceeded:
        _fail(
            ctx,
            job,
            chunk,
            f"exceeded the soft time limit of {ctx.settings.task_soft_time_limit_s:.0f} s: use a smaller --chunk-size",
        )
        raise
    except Exception as error:
        if lease.lost.is_set():
            return _drop(ctx, job, chunk, attempt, f"its lease was lost and then {type(error).__name__}: {error}")
        if is_retryable(error) and task.request.retries < task.max_retries:
            raise task.retry(exc=error, countdown=min(2**task.request.retries, 30)) from error
        reason = str(error) if isinstance(error, EmbedqError) else f"{type(error).__name__}: {error}"
        _fail(ctx, job, chunk, reason)
        raise
    meta: dict[str, Any] = {
        "type": "done",
        "chunk": chunk,
        "attempt": attempt,
        "rows": len(texts),  # documents: under --long chunks the matrix has a row per window
        "dim": int(result.embeddings.shape[1]),
        "tokens": result.tokens,
        "padded_tokens": result.padded_tokens,
        "truncated": result.truncated,
        "batches": result.batches,
        "dtype": result.dtype,
        "ms": round((time.perf_counter() - t0) * 1000.0, 1),
    }
    if result.emulated:
        meta["emulated"] = True  # bf16 without native support: the producer tells the user (EMULATED_BF16)
    if options.get("long", TRUNCATE) != TRUNCATE:
        # Echoed, so that a producer can tell a worker that knows the policy from an older one that ignored it.
        meta.update(long=options["long"], split=result.split, windows=result.windows)
    return meta


def _stats_of(meta: dict[str, Any]) -> dict[str, int]:
    return {
        "chunks_done": 1,
        "docs": meta["rows"],
        "tokens": meta["tokens"],
        "padded_tokens": meta["padded_tokens"],
        "batches": meta["batches"],
        "encode_ms": int(meta["ms"]),
    }
