"""Task bodies, kept thin: context -> encode -> store -> metadata."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from workers import events, runtime
from workers.app import app
from workers.config import TASK_EMBED_CHUNK
from workers.errors import EmbedqError, ModelMismatch, is_retryable

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
    events.publish(ctx.coordination, ctx.keys, job, event, {"chunks_failed": 1, "chunks_quarantined": int(quarantined)})


def delivery_field(chunk: int, task_id: str | None, retries: int | None) -> str:
    """The deliveries-hash field of one message: `chunk:task id:retry`, so counts can be summed per chunk."""
    return f"{chunk}:{task_id or '-'}:{retries or 0}"


@app.task(name=TASK_EMBED_CHUNK, bind=True, max_retries=5)
def embed_chunk(self: Any, job: str, chunk: int, texts: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """Embed `texts` (chunk `chunk` of job `job`), store the float32 matrix, report small metadata."""
    ctx = runtime.current()
    deliveries_key = ctx.keys.deliveries(job)
    # Counted per message: a redelivery after a worker died keeps the task id and the retry number,
    # while a deliberate retry or a resend by the producer is a new message with a fresh count.
    field = delivery_field(chunk, self.request.id, self.request.retries)
    started = ctx.coordination.hincrby(deliveries_key, field, 1)
    ctx.coordination.expire(deliveries_key, events.EVENTS_TTL_S)
    if started > ctx.settings.max_deliveries:
        reason = (
            f"its worker died {started - 1} times while running it "
            "(killed by the out-of-memory killer, a crash, or a text that crashes the model)"
        )
        log.error("job %s chunk %d %s", job, chunk, reason)
        _fail(ctx, job, chunk, reason, quarantined=True)
        return {"chunk": chunk, "quarantined": True}

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
        )
        ctx.store(options.get("results", "redis")).put(job, chunk, result.embeddings)
    except SoftTimeLimitExceeded:
        _fail(
            ctx,
            job,
            chunk,
            f"exceeded the soft time limit of {ctx.settings.task_soft_time_limit_s:.0f} s: use a smaller --chunk-size",
        )
        raise
    except Exception as error:
        if is_retryable(error) and self.request.retries < self.max_retries:
            raise self.retry(exc=error, countdown=min(2**self.request.retries, 30)) from error
        reason = str(error) if isinstance(error, EmbedqError) else f"{type(error).__name__}: {error}"
        _fail(ctx, job, chunk, reason)
        raise

    meta: events.ChunkDone = {
        "type": "done",
        "chunk": chunk,
        "rows": int(result.embeddings.shape[0]),
        "dim": int(result.embeddings.shape[1]),
        "tokens": result.tokens,
        "padded_tokens": result.padded_tokens,
        "truncated": result.truncated,
        "batches": result.batches,
        "dtype": result.dtype,
        "ms": round((time.perf_counter() - t0) * 1000.0, 1),
        "worker": f"{_HOST}:{os.getpid()}",
    }
    events.publish(
        ctx.coordination,
        ctx.keys,
        job,
        meta,
        {
            "chunks_done": 1,
            "docs": meta["rows"],
            "tokens": result.tokens,
            "padded_tokens": result.padded_tokens,
            "batches": result.batches,
            "encode_ms": int(meta["ms"]),
        },
    )
    return dict(meta)
