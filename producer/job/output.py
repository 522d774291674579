"""Output files: rows written at their offset as chunks arrive, made final only when the job is complete.

While a job runs, everything lives under `OUTPUT.partial*` names:
- `OUTPUT.partial`      the float32 rows, after a header slot of fixed size, at offset row * dim * 4;
- `OUTPUT.partial.log`  one JSON line per finished chunk (what a rerun of the same job reuses);
- `OUTPUT.partial.ids`  the ids of valid records, in row order.
`finish()` writes the real .npy header (or the Parquet file), the manifest, and renames: an
`OUTPUT` file that exists is complete. With a precision other than float32 (producer/job/quantize.py)
the partial file stays float32 to the end, so a rerun resumes from it whatever happened; `finish()`
reads it twice in blocks (calibration ranges, then quantised rows into a temporary file) and renames.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from producer.job import quantize

HEADER_BYTES = 128  # an .npy v1.0 header for a 2-D array always fits in 128 bytes
_MAGIC = b"\x93NUMPY\x01\x00"
#: Rows read at a time when the partial file is read back: about this many bytes of float32 each.
BLOCK_BYTES = 16 << 20


def npy_header(rows: int, dim: int, descr: str = "<f4") -> bytes:
    """An .npy v1.0 header for a C-ordered (rows, dim) array of `descr`, padded to HEADER_BYTES."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    body_len = HEADER_BYTES - len(_MAGIC) - 2
    body = text.ljust(body_len - 1) + "\n"
    return _MAGIC + body_len.to_bytes(2, "little") + body.encode("latin1")


def output_kind(path: str) -> str:
    if path.endswith(".npy"):
        return "npy"
    if path.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"output {path!r}: name it .npy or .parquet")


@dataclass(frozen=True)
class ChunkRecord:
    """A finished chunk as the resume log keeps it."""

    chunk: int
    start: int
    rows: int
    tokens: int
    padded_tokens: int
    truncated: int
    dtype: str
    #: Under --long chunk-mean / chunks: documents split into windows, and the windows they became.
    split: int = 0
    windows: int = 0


def read_resume_log(output: str) -> tuple[dict[str, Any], list[ChunkRecord]] | None:
    """The header and finished chunks that an unfinished run wrote for OUTPUT; None when there are none.

    A line cut short by a crash ends the list: everything before it is sound.
    """
    log_path, data_path = Path(f"{output}.partial.log"), Path(f"{output}.partial")
    if not (log_path.exists() and data_path.exists()):
        return None
    with open(log_path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    try:
        header = json.loads(lines[0])
    except (IndexError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    records: list[ChunkRecord] = []
    for line in lines[1:]:
        try:
            records.append(ChunkRecord(**json.loads(line)))
        except (ValueError, TypeError):
            break
    return header, records


def earlier_run(output: str) -> tuple[str, set[int]] | None:
    """The job id of an unfinished earlier run that wrote OUTPUT, and the chunk sizes its finished chunks fit.

    None when there is no such run. A size is a guess (chunk 0's rows; a later chunk's start over its index)
    that the caller checks against the job id: an automatic chunk size follows the child count, so a rerun
    given other --workers finds here the size that lets it resume (producer/job/spec.py).
    """
    log = read_resume_log(output)
    if log is None or "job" not in log[0]:
        return None
    header, records = log
    sizes = {r.rows if r.chunk == 0 else r.start // r.chunk for r in records if r.chunk == 0 or r.start % r.chunk == 0}
    return str(header["job"]), sizes


class PartialOutput:
    """The files of one job in progress, and what a previous run of the same job already finished."""

    def __init__(self, output: str, dim: int, job_id: str, precision: str = "float32") -> None:
        quantize.check_precision(precision)
        self.output = Path(output)
        self.kind = output_kind(output)
        self.dim = dim
        #: The partial file is float32 whatever this is: it only changes what `finish()` writes.
        self.precision = precision
        self.job_id = job_id
        self.data_path = Path(f"{output}.partial")
        self.log_path = Path(f"{output}.partial.log")
        self.ids_path = Path(f"{output}.partial.ids")
        self.rejects_path = Path(f"{output}.rejects.jsonl.partial")
        self.manifest_path = Path(f"{output}.manifest.json")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.finished: dict[int, ChunkRecord] = self._read_log()
        if not self.finished:
            self._start_fresh()
        self._data = open(self.data_path, "r+b")  # noqa: SIM115 - closed in close()
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        # Ids and rejects are rebuilt from the input on every run, so they always match the rows.
        self._ids: IO[str] = open(self.ids_path, "w", encoding="utf-8")  # noqa: SIM115
        self._rejects: IO[str] | None = None

    def _read_log(self) -> dict[int, ChunkRecord]:
        log = read_resume_log(str(self.output))
        if log is None:
            return {}
        header, records = log
        if header.get("job") != self.job_id or header.get("dim") != self.dim:
            return {}  # a different job wrote these files: start over
        return {record.chunk: record for record in records}

    def _start_fresh(self) -> None:
        with open(self.data_path, "wb") as data:
            data.write(b"\0" * HEADER_BYTES)
        with open(self.log_path, "w", encoding="utf-8") as log:
            log.write(json.dumps({"job": self.job_id, "dim": self.dim}) + "\n")

    def add_id(self, record_id: str) -> None:
        self._ids.write(json.dumps(record_id, ensure_ascii=False) + "\n")

    def add_reject(self, source: str, line: int, reason: str, raw: str) -> None:
        if self._rejects is None:
            self._rejects = open(self.rejects_path, "w", encoding="utf-8")  # noqa: SIM115
        entry = {"source": source, "line": line, "reason": reason, "record": raw}
        self._rejects.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def rows_of(self, record: ChunkRecord) -> int:
        """Output rows of a finished chunk: one per document here (producer/job/window_output.py differs)."""
        return record.rows

    def write_chunk(self, record: ChunkRecord, array: np.ndarray, windows: np.ndarray | None = None) -> None:
        """Write rows at their offset, make them durable, then log the chunk as finished (`windows`, a
        window table, matters only to producer/job/window_output.py)."""
        if array.shape != (record.rows, self.dim):
            raise ValueError(f"chunk {record.chunk}: expected {(record.rows, self.dim)} rows, got {array.shape}")
        self._data.seek(HEADER_BYTES + record.start * self.dim * 4)
        self._data.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
        self._data.flush()
        os.fdatasync(self._data.fileno())
        self._log.write(json.dumps(record.__dict__) + "\n")
        self._log.flush()
        self.finished[record.chunk] = record

    def close(self) -> None:
        for handle in (self._data, self._log, self._ids, self._rejects):
            if handle is not None and not handle.closed:
                handle.close()

    def _ids_iter(self) -> Iterator[str]:
        with open(self.ids_path, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)

    def finish(self, rows: int, manifest: dict[str, Any]) -> None:
        """Make the output final: header or Parquet, manifest, renames; then drop the partial files."""
        self.close()
        expected = HEADER_BYTES + rows * self.dim * 4
        with open(self.data_path, "r+b") as data:
            data.truncate(expected)
            data.seek(0)
            data.write(npy_header(rows, self.dim))
            data.flush()
            os.fsync(data.fileno())
        ranges = None
        if self.precision in quantize.CALIBRATED:
            # One pass for the ranges of the whole job, a second one (below) to quantise with them.
            ranges = quantize.calibration_ranges(self._float_blocks(rows), self.dim)
        self._write_manifest({**manifest, **quantize.manifest_fields(self.precision, ranges)})
        if self.rejects_path.exists():
            os.replace(self.rejects_path, str(self.output) + ".rejects.jsonl")
        else:
            Path(str(self.output) + ".rejects.jsonl").unlink(missing_ok=True)
        blocks = (quantize.quantize(block, self.precision, ranges) for block in self._float_blocks(rows))
        if self.kind == "npy" and self.precision == "float32":
            os.replace(self.data_path, self.output)
        elif self.kind == "npy":
            self._write_npy(rows, blocks)
            self.data_path.unlink()
        else:
            self._write_parquet(blocks)
            self.data_path.unlink()
        self.log_path.unlink(missing_ok=True)
        self.ids_path.unlink(missing_ok=True)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        temp = self.manifest_path.with_suffix(".json.partial")
        head = json.dumps(manifest, indent=2, ensure_ascii=False)
        with open(temp, "w", encoding="utf-8") as handle:
            # Ids are streamed from disk: the producer never holds all of them in memory.
            handle.write(head[:-2] + ',\n  "ids": [')
            for index, record_id in enumerate(self._ids_iter()):
                handle.write(("," if index else "") + json.dumps(record_id, ensure_ascii=False))
            handle.write("]\n}\n")
        os.replace(temp, self.manifest_path)

    def _block_rows(self) -> int:
        return max(1, BLOCK_BYTES // (self.dim * 4))

    def _float_blocks(self, rows: int) -> Iterator[np.ndarray]:
        """The float32 rows of the partial file, a block at a time.

        Plain reads, not a memory map: pages of a map stay in the process's RSS once touched, so a
        large job would end holding its whole matrix; a block read and dropped keeps memory bounded.
        """
        step = self._block_rows()
        with open(self.data_path, "rb") as data:
            data.seek(HEADER_BYTES)
            for start in range(0, rows, step):
                count = min(step, rows - start)
                block = np.fromfile(data, dtype="<f4", count=count * self.dim)
                if block.size != count * self.dim:
                    raise ValueError(f"{self.data_path}: expected {rows} rows of {self.dim}, the file is shorter")
                yield block.reshape(count, self.dim)

    def _write_npy(self, rows: int, blocks: Iterator[np.ndarray]) -> None:
        dtype = quantize.output_dtype(self.precision)
        width = quantize.output_width(self.precision, self.dim)
        temp = Path(str(self.output) + ".tmp")
        with open(temp, "wb") as out:
            out.write(npy_header(rows, width, dtype.str))
            for block in blocks:
                out.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, self.output)

    def _write_parquet(self, blocks: Iterator[np.ndarray]) -> None:
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # why: producer/job/parquet_input.py
        import pyarrow as pa
        import pyarrow.parquet as pq

        dtype = quantize.output_dtype(self.precision)
        width = quantize.output_width(self.precision, self.dim)
        value_type = pa.from_numpy_dtype(dtype)
        schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(value_type, width))])
        temp = Path(str(self.output) + ".tmp")
        ids = self._ids_iter()
        with pq.ParquetWriter(temp, schema) as writer:
            for block in blocks:
                block_ids = [next(ids) for _ in range(block.shape[0])]
                values = pa.array(np.ascontiguousarray(block, dtype=dtype).reshape(-1), type=value_type)
                column = pa.FixedSizeListArray.from_arrays(values, width)
                writer.write_table(pa.Table.from_arrays([pa.array(block_ids, pa.string()), column], schema=schema))
        os.replace(temp, self.output)

    def discard(self) -> None:
        """Remove every partial file (used when a job is abandoned before any chunk finished)."""
        self.close()
        for path in (self.data_path, self.log_path, self.ids_path, self.rejects_path):
            path.unlink(missing_ok=True)
        Path(str(self.output) + ".tmp").unlink(missing_ok=True)
