"""Parquet corpora: a text column and an id column, read a record batch at a time.

Only the two columns are read, batch by batch (`ParquetFile.iter_batches`), so memory is bounded by a
row group's column chunks, never by the file. A row's "line" is its 1-based row number: that is what
errors and OUTPUT.rejects.jsonl name. pyarrow comes with the `parquet` extra; the command line checks
for it before anything starts (producer/cli/main.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from producer.job.readers import Record, Rejected, _preview, check_text
from workers.protocol.errors import InputError

#: Rows converted to Python objects at a time; small, so that a batch's strings stay a few MB.
BATCH_ROWS = 1024


def _open(path: str) -> Any:
    # Arrow's default allocator (mimalloc) keeps freed pages: reading 100,000 rows batch by batch grew
    # the producer's RSS by ~90 MB with it, ~25 MB with the system allocator (which pre_buffer=False and
    # one thread bring down further). Only a default: it applies if pyarrow is not imported yet.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pre_buffer=True (the default) reads column chunks ahead and keeps them: after iter_batches over
        # a 11.7 MB file, 11.7 MB were still allocated in Arrow's pool (64 KB without).
        return pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"not a readable Parquet file ({error})", source=path) from None


def read_parquet(
    path: str, text_field: str, id_field: str, *, batch_rows: int = BATCH_ROWS
) -> Iterator[Record | Rejected]:
    """Records of the `text_field` column, ids from `id_field` (missing column or null: the row number).

    A null or non-string text is Rejected, as a bad record of any other format is; a missing text column
    is one InputError naming the columns there are.
    """
    parquet = _open(path)
    try:
        names = list(parquet.schema_arrow.names)
        if text_field not in names:
            raise InputError(f"no column {text_field!r} (columns: {', '.join(names)}); pass --text-field", source=path)
        has_id = id_field in names and id_field != text_field
        columns = [text_field, id_field] if has_id else [text_field]
        row = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if has_id else [None] * len(texts)
            for text, record_id in zip(texts, ids, strict=True):
                row += 1
                reason = check_text(text, text_field)
                if reason:
                    yield Rejected(row, reason, _preview(repr(text)))
                else:
                    yield Record(row, str(row) if record_id is None else str(record_id), text)
    finally:
        parquet.close()


def count_rows(path: str) -> int | None:
    """Rows of a Parquet file from its footer (no data read); None when it cannot be read."""
    try:
        parquet = _open(path)
    except InputError:
        return None
    try:
        return int(parquet.metadata.num_rows)
    finally:
        parquet.close()
