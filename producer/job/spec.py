"""What a corpus job is: its options, its identity (for resuming), and the report it ends with."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from producer.job.chunk_plan import MIN_TAIL_ROWS
from workers.protocol.long_docs import TRUNCATE
from workers.protocol.model_info import ModelInfo
from workers.protocol.queues import BULK
from workers.protocol.routing import queue_name


@dataclass(frozen=True)
class JobOptions:
    """What a job asks of the workers and how the producer runs it."""

    model: ModelInfo
    normalize: bool = True
    dtype: str = "fp32"
    batch_tokens: int | None = None
    results: str = "redis"
    chunk_rows: int = 256
    max_in_flight: int = 8
    #: Tail chunks shrink to what is left / tail_split (producer/job/chunk_plan.py); 0: every chunk full.
    tail_split: int = 0
    #: ... but never below this many rows (producer/job/chunk_plan.py MIN_TAIL_ROWS).
    min_chunk_rows: int = MIN_TAIL_ROWS
    text_field: str = "text"
    id_field: str = "id"
    input_format: str = "auto"
    on_invalid: str = "fail"
    #: Output precision (producer/job/quantize.py). Not part of the job's identity: the partial file is
    #: float32 whatever it is, so a rerun with another precision reuses the chunks already finished.
    precision: str = "float32"
    #: A chunk with no news for this long is sent again (its message may be lost).
    stall_timeout_s: float = 600.0
    #: With no live worker for this long (none started, or every host lost), the job fails naming its rows.
    workers_lost_s: float = 60.0
    #: Sends of one chunk before the job gives up on it (backup copies of stragglers do not count).
    max_sends: int = 3
    #: How long to keep trying while the broker is unreachable mid-job.
    broker_retry_s: float = 300.0
    #: What becomes of a document over the model's length (workers/protocol/long_docs.py).
    long: str = TRUNCATE
    #: The prompt text prepended to every text (workers/protocol/prompts.py), and the name it came from.
    prompt: str = ""
    prompt_name: str | None = None
    #: Leading components kept of each vector (Matryoshka), None for all of them.
    dimensions: int | None = None

    @property
    def output_dim(self) -> int:
        """Width of the output rows: the dimensions kept, else the model's."""
        return self.dimensions or self.model.dim

    @property
    def queue(self) -> str:
        """The model's bulk queue: every send of the job goes there, re-sends and backups too."""
        return queue_name(BULK, self.model.name)

    def task_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "model": self.model.name,
            "pooling": self.model.pooling,
            "max_length": self.model.max_length,
            "normalize": self.normalize,
            "dtype": self.dtype,
            "results": self.results,
        }
        if self.batch_tokens:
            options["batch_tokens"] = self.batch_tokens
        if self.long != TRUNCATE:  # absent under truncate, so that such jobs keep the ids they always had
            options["long"] = self.long
        # Sent only when asked for, so that the ids of jobs that use neither stay what they were (they resume).
        # Always under --long windows: a worker whose folder has a default prompt would otherwise apply it, and
        # windows take no prompt.
        if self.prompt or self.model.default_prompt_name is not None or self.long != TRUNCATE:
            options["prompt"] = self.prompt
        if self.dimensions:
            options["dimensions"] = self.dimensions
        return options


@dataclass
class JobReport:
    """What a finished (or failed) job did; the manifest and the summary line come from it."""

    job_id: str
    rows: int = 0
    chunks: int = 0
    reused_chunks: int = 0
    resent_chunks: int = 0
    #: reason (producer/job/dispatcher.py RESEND_REASONS) -> copies sent again for it
    resent_by_reason: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    padded_tokens: int = 0
    truncated: int = 0
    #: Under --long chunk-mean / chunks: documents split into windows, and the windows they became.
    split: int = 0
    windows: int = 0
    rejected: int = 0
    dtypes: set[str] = field(default_factory=set)
    failures: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def docs_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0


def job_id_for(input_path: str, output: str, options: JobOptions) -> str:
    """The same input, output and options give the same id, so a rerun resumes the job."""
    if input_path == "-":
        return uuid.uuid4().hex[:16]
    stat = os.stat(input_path)
    identity = {
        "input": os.path.abspath(input_path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "output": os.path.abspath(output),
        "options": options.task_options(),
        "chunk_rows": options.chunk_rows,
        # Part of the chunk plan: a rerun must cut the same chunks to reuse them by index.
        "tail_split": options.tail_split,
        "min_chunk_rows": options.min_chunk_rows,
        "fields": [options.text_field, options.id_field, options.input_format, options.on_invalid],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def with_earlier_chunk_rows(input_path: str, output: str, options: JobOptions) -> JobOptions:
    """`options` with the chunk size of an unfinished earlier run of this same job, when there is one.

    `--chunk-size` auto follows the number of local pool children, and the chunk size is part of the job id:
    without this, a rerun given other --workers would cut other chunks and start over instead of resuming.
    """
    from producer.job.output import earlier_run

    earlier = None if input_path == "-" else earlier_run(output)
    if earlier is None:
        return options
    job, sizes = earlier
    for rows in sorted(sizes):
        candidate = replace(options, chunk_rows=rows)
        if job_id_for(input_path, output, candidate) == job:
            return candidate
    return options
