"""The producer's side of the broker: a Celery app that only sends, and a Redis client for events."""

from __future__ import annotations

import json
from typing import Any

from celery import Celery

from workers.protocol.config import TASK_EMBED_CHUNK, Settings, celery_config

PREVIEW_CHARS = 60


def sender_app(settings: Settings) -> Celery:
    """A Celery app configured like the workers', used only to send tasks (it never imports torch)."""
    app = Celery("embedq-producer", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def abbreviate(texts: list[str], keep: int = 3) -> str:
    """What Flower shows for a chunk's texts: the first few, cut short, never whole documents."""
    shown = [t if len(t) <= PREVIEW_CHARS else t[:PREVIEW_CHARS] + "…" for t in texts[:keep]]
    more = f", … +{len(texts) - keep} more" if len(texts) > keep else ""
    return f"[{', '.join(json.dumps(t, ensure_ascii=False) for t in shown)}{more}] ({len(texts)} texts)"


def task_id_for(job: str, chunk: int, attempt: int) -> str:
    """Task ids read `job-chunk-attempt`: Flower, logs and the deliveries hash name a copy by it."""
    return f"{job}-{chunk}-{attempt}"


def send_chunk(
    app: Celery,
    job: str,
    chunk: int,
    texts: list[str],
    options: dict[str, Any],
    *,
    queue: str,
    attempt: int = 0,
    priority: int | None = None,
) -> str:
    """Send one chunk task by name; returns its task id (job, chunk and attempt make it readable).

    No Celery `expires`: a web request's deadline travels in `options` instead (workers/protocol/deadlines.py),
    so that a worker drops a late chunk unrun *and counts it*, which Celery's own expiry does not.
    """
    task_id = task_id_for(job, chunk, attempt)
    app.send_task(
        TASK_EMBED_CHUNK,
        # The attempt travels with the task: the worker's lease names it (workers/lease.py).
        args=[job, chunk, texts, {**options, "attempt": attempt}],
        task_id=task_id,
        queue=queue,
        routing_key=queue,
        argsrepr=f"(job={job!r}, chunk={chunk}, texts={abbreviate(texts)})",
        kwargsrepr=json.dumps({k: v for k, v in options.items() if k != "results"}),
        priority=priority,
    )
    return task_id
