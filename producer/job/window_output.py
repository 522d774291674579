"""`--long chunks` output: one Parquet row per window, in document order, resumable like every output.

How many windows a chunk gives is known only when its result arrives, so rows cannot go to an offset
fixed in advance as in producer/job/output.py. Instead each finished chunk is appended, in arrival
order, to `OUTPUT.partial` (float32 rows after the same header slot) and `OUTPUT.partial.windows` (its
int32 window table, workers/protocol/long_docs.py), made durable, and only then logged in
`OUTPUT.partial.log`. The log's order is the append order, so a rerun finds every chunk's offset by
summing the rows of the lines before it, and cuts off whatever tail a crash left unlogged. `finish()`
walks the chunks in index order and writes the Parquet file with columns `id`, `window`, `token_start`,
`token_end`, `embedding`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

import numpy as np

from producer.job.output import BLOCK_BYTES, HEADER_BYTES, ChunkRecord, PartialOutput
from workers.protocol.long_docs import CHUNKS, TRUNCATE, WINDOW_COLUMNS

#: Bytes of one window-table row: four int32.
TABLE_ROW_BYTES = 4 * len(WINDOW_COLUMNS)


def open_partial(output: str, dim: int, job_id: str, long: str = TRUNCATE, precision: str = "float32") -> PartialOutput:
    """The partial output a job with this long-document policy and output precision writes."""
    if long != CHUNKS:
        return PartialOutput(output, dim, job_id, precision)
    if precision != "float32":  # the CLI refuses this combination first, in one line
        raise ValueError(f"--long chunks writes float32 window rows, not {precision}")
    return WindowOutput(output, dim, job_id)


def unsupported(long: str, event: dict[str, Any], windows: np.ndarray | None) -> str:
    """Why a done chunk cannot be used under `long` ("" when it can): a worker that predates the policy
    ignores it, and would truncate silently."""
    if long == TRUNCATE:
        return ""
    if event.get("long") != long or (long == CHUNKS and windows is None):
        return f"its worker ({event.get('worker', '?')}) does not know --long {long}: upgrade the workers"
    return ""


class WindowOutput(PartialOutput):
    """The files of a `--long chunks` job in progress (see the module docstring)."""

    def __init__(self, output: str, dim: int, job_id: str) -> None:
        self.windows_path = Path(f"{output}.partial.windows")
        super().__init__(output, dim, job_id)
        if self.kind != "parquet":
            self.close()
            raise ValueError(f"output {output!r}: --long chunks writes Parquet; name it .parquet")
        #: chunk -> its first row in the appended files; dicts keep the log's (append) order.
        self.offsets: dict[int, int] = {}
        end = 0
        for chunk, record in self.finished.items():
            self.offsets[chunk] = end
            end += self.rows_of(record)
        self._end = end
        # A crash between an append and its log line leaves a tail that no line names: cut it off.
        self._data.truncate(HEADER_BYTES + end * dim * 4)
        self._table: IO[bytes] = open(self.windows_path, "r+b")  # noqa: SIM115 - closed in close()
        self._table.truncate(end * TABLE_ROW_BYTES)

    def rows_of(self, record: ChunkRecord) -> int:
        """A chunk's windows: one per document that fits, plus the windows of those split."""
        return record.rows - record.split + record.windows

    def _read_log(self) -> dict[int, ChunkRecord]:
        finished = super()._read_log()
        rows = sum(self.rows_of(record) for record in finished.values())
        have_data = self.data_path.exists() and self.data_path.stat().st_size >= HEADER_BYTES + rows * self.dim * 4
        have_table = self.windows_path.exists() and self.windows_path.stat().st_size >= rows * TABLE_ROW_BYTES
        return finished if have_data and have_table else {}  # a file cut short: start over

    def _start_fresh(self) -> None:
        super()._start_fresh()
        self.windows_path.write_bytes(b"")

    def write_chunk(self, record: ChunkRecord, array: np.ndarray, windows: np.ndarray | None = None) -> None:
        """Append the chunk's rows and window table, make both durable, then log the chunk as finished."""
        rows = self.rows_of(record)
        if windows is None or array.shape != (rows, self.dim) or windows.shape != (rows, len(WINDOW_COLUMNS)):
            got = None if windows is None else windows.shape
            raise ValueError(f"chunk {record.chunk}: expected {rows} window rows with a table, got {array.shape}/{got}")
        documents = windows[:, 0]
        in_order = not np.any(np.diff(documents) < 0) and np.array_equal(np.unique(documents), np.arange(record.rows))
        if not in_order:
            raise ValueError(f"chunk {record.chunk}: its window table does not list its {record.rows} documents")
        at = self._end
        for handle, offset, block in (
            (self._data, HEADER_BYTES + at * self.dim * 4, np.ascontiguousarray(array, dtype="<f4")),
            (self._table, at * TABLE_ROW_BYTES, np.ascontiguousarray(windows, dtype="<i4")),
        ):
            handle.seek(offset)
            handle.write(block.tobytes())
            handle.flush()
            os.fdatasync(handle.fileno())
        self._log.write(json.dumps(record.__dict__) + "\n")
        self._log.flush()
        self.finished[record.chunk] = record
        self.offsets[record.chunk] = at
        self._end = at + rows

    def close(self) -> None:
        super().close()
        table = getattr(self, "_table", None)
        if table is not None and not table.closed:
            table.close()

    def discard(self) -> None:
        super().discard()
        self.windows_path.unlink(missing_ok=True)

    def finish(self, rows: int, manifest: dict[str, Any]) -> None:
        """Write the Parquet file in document order, the manifest and the rejects; drop the partial files."""
        self.close()
        self._write_manifest(manifest)
        if self.rejects_path.exists():
            os.replace(self.rejects_path, str(self.output) + ".rejects.jsonl")
        else:
            Path(str(self.output) + ".rejects.jsonl").unlink(missing_ok=True)
        self._write_window_parquet(rows)
        for path in (self.data_path, self.windows_path, self.log_path, self.ids_path):
            path.unlink(missing_ok=True)

    def _write_window_parquet(self, rows: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                ("id", pa.string()),
                *((name, pa.int32()) for name in WINDOW_COLUMNS[1:]),
                ("embedding", pa.list_(pa.float32(), self.dim)),
            ]
        )
        width = len(WINDOW_COLUMNS)
        # Rows per Parquet write: about BLOCK_BYTES of float32, as producer/job/output.py writes.
        block_rows = max(1, BLOCK_BYTES // (self.dim * 4))
        temp = Path(str(self.output) + ".tmp")
        ids = self._ids_iter()
        pending: list[tuple[list[str], np.ndarray, np.ndarray]] = []
        pending_rows = next_document = 0
        # Plain reads at each chunk's offset, never a memory map: mapped pages stay in the producer's RSS once
        # touched, so a large job would end up holding its whole matrix (see PartialOutput._float_blocks).
        with (
            pq.ParquetWriter(temp, schema) as writer,
            open(self.data_path, "rb") as data,
            open(self.windows_path, "rb") as windows_file,
        ):

            def read_rows(handle: IO[bytes], offset: int, count: int, dtype: str, columns: int) -> np.ndarray:
                handle.seek(offset)
                block = np.fromfile(handle, dtype=dtype, count=count * columns)
                if block.size != count * columns:
                    raise ValueError(f"{handle.name}: expected {count} more rows at byte {offset}, the file is shorter")
                return block.reshape(count, columns)

            def flush() -> None:
                if not pending:
                    return
                names = [name for block_ids, _, _ in pending for name in block_ids]
                windows = np.concatenate([block for _, block, _ in pending])
                vectors = np.concatenate([block for _, _, block in pending])
                pending.clear()
                columns = [pa.array(names, pa.string())]
                columns += [pa.array(windows[:, i], pa.int32()) for i in range(1, len(WINDOW_COLUMNS))]
                values = pa.array(vectors.reshape(-1), type=pa.float32())
                columns.append(pa.FixedSizeListArray.from_arrays(values, self.dim))
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))

            for chunk in sorted(self.finished):
                record = self.finished[chunk]
                if record.start != next_document:
                    raise ValueError(f"chunk {chunk} starts at row {record.start}, expected {next_document}")
                next_document += record.rows
                chunk_ids = [next(ids) for _ in range(record.rows)]
                at, count = self.offsets[chunk], self.rows_of(record)
                block = read_rows(windows_file, at * TABLE_ROW_BYTES, count, "<i4", width)
                vectors = read_rows(data, HEADER_BYTES + at * self.dim * 4, count, "<f4", self.dim)
                pending.append(([chunk_ids[d] for d in block[:, 0]], block, vectors))
                pending_rows += count
                if pending_rows >= block_rows:
                    flush()
                    pending_rows = 0
            flush()
        if next_document != rows:
            temp.unlink(missing_ok=True)
            raise ValueError(f"the finished chunks cover {next_document} documents, expected {rows}")
        os.replace(temp, self.output)
