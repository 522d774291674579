"""Parquet corpora: a text column and an id column, read a record batch at a time.

Only the two columns are read, batch by batch (`ParquetFile.iter_batches`), so memory is bounded by a
row group's column chunks, never by the file. This module yields raw values; producer/job/readers.py
validates them as it does every format's. A row's "line" is its 1-based row number: that is what
errors and OUTPUT.rejects.jsonl name. pyarrow comes with the `parquet` extra; the command line checks
for it before anything starts (producer/cli/embed.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from workers.protocol.errors import InputError

#: (1-based row number, text value, id value), values as pyarrow gives them (None for a null).
Row = tuple[int, Any, Any]
#: Rows converted to Python objects at a time; small, so that a batch's strings stay a few MB.
BATCH_ROWS = 1024


def _open(path: str) -> Any:
    # Reading 100,000 rows batch by batch grew RSS by 88 MB with pyarrow's defaults and by 24 MB with the
    # system allocator (mimalloc, the default, keeps freed pages), pre_buffer=False and one thread.
    # Only a default: it applies if pyarrow is not imported yet, and ARROW_DEFAULT_MEMORY_POOL overrides it.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pre_buffer=True (the default) reads column chunks ahead and keeps them: after iter_batches over
        # a 11.7 MB file, 11.7 MB were still allocated in Arrow's pool (64 KB without).
        return pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"not a readable Parquet file ({error})", source=path) from None


def parquet_rows(path: str, text_field: str, id_field: str, *, batch_rows: int = BATCH_ROWS) -> Iterator[Row]:
    """(row number, text value, id value or None) for every row, as stored (None for a null).

    The id is None when `id_field` is not a column; a missing text column is one InputError naming
    the columns there are.
    """
    import pyarrow as pa

    parquet = _open(path)
    try:
        names = list(parquet.schema_arrow.names)
        if text_field not in names:
            raise InputError(f"no column {text_field!r} (columns: {', '.join(names)}); pass --text-field", source=path)
        has_id = id_field in names and id_field != text_field
        columns = [text_field, id_field] if has_id else [text_field]
        row = 0
        batches = parquet.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as error:
                # A damaged page: pyarrow's own text spans lines and names neither the file nor the row.
                printable = "".join(c if c.isprintable() else " " for c in str(error))
                detail = " ".join(printable.split()) or type(error).__name__
                raise InputError(f"unreadable Parquet data after row {row} ({detail[:200]})", source=path) from None
            if batch is None:
                break
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if has_id else [None] * len(texts)
            for text, record_id in zip(texts, ids, strict=True):
                row += 1
                yield row, text, record_id
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
