"""Quantised output and Parquet input, without processes: the output writer and the reader on their own.

The quantised files must equal sentence-transformers' `quantize_embeddings` on the float32 rows,
calibrated on all of them, exactly, however the rows were split into chunks and blocks; the end-to-end
runs through the command line are in tests/test_parquet_and_precision.py.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.job import output as output_module
from producer.job.output import ChunkRecord, PartialOutput
from producer.job.quantize import PRECISIONS, dequantize, quantize_queries
from producer.job.readers import Record, Rejected, count_lines, read_records
from workers.protocol.errors import InputError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sentence_transformers.quantization import quantize_embeddings
    from sentence_transformers.util.quantization import _dequantize_embeddings

ROWS, DIM, CHUNK = 70, 20, 16  # DIM not a multiple of 8: the last packed byte is padded


def _vectors(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    rows[:, 3] = 0.25  # a constant dimension: sentence-transformers' step of 1 for it
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _write_chunks(partial: PartialOutput, vectors: np.ndarray, chunks: range) -> None:
    for index in chunks:
        start = index * CHUNK
        block = vectors[start : start + CHUNK]
        partial.write_chunk(ChunkRecord(index, start, block.shape[0], 0, 0, 0, "fp32"), block)


def _finish(out: Path, precision: str, vectors: np.ndarray) -> dict[str, object]:
    partial = PartialOutput(str(out), DIM, "job", precision)
    for row in range(ROWS):
        partial.add_id(f"r{row}")
    _write_chunks(partial, vectors, range(0, (ROWS + CHUNK - 1) // CHUNK))
    partial.finish(ROWS, {"job": "job"})
    return dict(json.loads(Path(f"{out}.manifest.json").read_text()))


def _read(out: Path) -> np.ndarray:
    if out.suffix == ".npy":
        return np.load(out)
    table = pq.read_table(out)
    column = table.column("embedding").combine_chunks()
    width = column.type.list_size
    return column.values.to_numpy().reshape(-1, width)


@pytest.mark.parametrize("kind", ["npy", "parquet"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_output_equals_sentence_transformers_calibrated_on_the_whole_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, kind: str
) -> None:
    # given rows read back in blocks of 8 (so calibration and quantisation each span several blocks)
    monkeypatch.setattr(output_module, "BLOCK_BYTES", 8 * DIM * 4)
    vectors = _vectors()
    out = tmp_path / f"out.{kind}"
    # when a job's chunks are written and the output finished at this precision
    manifest = _finish(out, precision, vectors)
    # then the file is sentence-transformers' quantisation with the whole job as calibration, exactly
    expected = quantize_embeddings(vectors, precision, calibration_embeddings=vectors)
    got = _read(out)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert manifest["precision"] == precision
    if precision.endswith("int8"):
        ranges = np.vstack((vectors.min(axis=0), vectors.max(axis=0)))
        np.testing.assert_array_equal(np.asarray(manifest["ranges"], dtype=np.float32), ranges)
    else:
        assert "ranges" not in manifest
    if kind == "parquet":
        assert pq.read_table(out).column("id").to_pylist() == [f"r{row}" for row in range(ROWS)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, f"{out.name}.manifest.json"])


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary"])
def test_queries_quantised_with_the_manifest_match_the_corpus_scale(tmp_path: Path, precision: str) -> None:
    # given a finished int8 job and queries the corpus never saw
    vectors = _vectors()
    manifest_path = tmp_path / "out.npy.manifest.json"
    _finish(tmp_path / "out.npy", precision, vectors)
    queries = _vectors(seed=1)[:5] * 1.5  # partly outside the corpus ranges: clipped as sentence-transformers clips
    # when they are quantised with the manifest
    got = quantize_queries(queries, manifest_path)
    # then they equal sentence-transformers' quantisation with the job's ranges
    ranges = np.vstack((vectors.min(axis=0), vectors.max(axis=0)))
    np.testing.assert_array_equal(got, quantize_embeddings(queries, precision, ranges=ranges))
    # and int8/uint8 rows go back to the float scale as sentence-transformers' rescoring puts them
    if precision in ("int8", "uint8"):
        expected = _dequantize_embeddings(got, precision, ranges)
        np.testing.assert_array_equal(dequantize(got, precision, ranges), expected)


def test_an_interrupted_int8_job_resumes_and_still_writes_the_exact_output(tmp_path: Path) -> None:
    # given a job stopped after two chunks, and a quantised temporary file a crash left half written
    vectors, out = _vectors(), tmp_path / "out.npy"
    first = PartialOutput(str(out), DIM, "job", "int8")
    _write_chunks(first, vectors, range(2))
    first.close()
    Path(f"{out}.tmp").write_bytes(b"half a file")
    # when the same job runs again (here asking for uint8: the partial rows are float32 whatever was asked)
    again = PartialOutput(str(out), DIM, "job", "uint8")
    assert sorted(again.finished) == [0, 1]
    for row in range(ROWS):
        again.add_id(str(row))
    _write_chunks(again, vectors, range(2, (ROWS + CHUNK - 1) // CHUNK))
    again.finish(ROWS, {"job": "job"})
    # then the output is exact and nothing partial is left
    np.testing.assert_array_equal(np.load(out), quantize_embeddings(vectors, "uint8", calibration_embeddings=vectors))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy", "out.npy.manifest.json"]


# -- Parquet input -------------------------------------------------------------------------------


def _parquet(path: Path, texts: list[object], ids: list[object] | None = None, **columns: list[object]) -> Path:
    data: dict[str, object] = {"text": texts, **columns}
    if ids is not None:
        data = {"id": ids, **data}
    pq.write_table(pa.table(data), path, row_group_size=3)  # several row groups, read as a stream
    return path


def test_parquet_records_stream_across_row_groups_with_ids_and_rejects(tmp_path: Path) -> None:
    # given a Parquet corpus of several row groups with a null text among good ones, and a null id
    path = _parquet(
        tmp_path / "c.parquet", ["a", "b", None, "d", "e", "", "g"], ["i0", "i1", "i2", None, "i4", "i5", "i6"]
    )
    # when it is read
    items = list(read_records(str(path)))
    # then good rows keep their ids (a null id is the row number), the null text is rejected with its row
    assert [(i.line, i.id, i.text) for i in items if isinstance(i, Record)] == [
        (1, "i0", "a"),
        (2, "i1", "b"),
        (4, "4", "d"),
        (5, "i4", "e"),
        (6, "i5", ""),
        (7, "i6", "g"),
    ]
    rejected = [i for i in items if isinstance(i, Rejected)]
    assert [(r.line, r.reason) for r in rejected] == [(3, "field 'text' is missing or null")]
    assert count_lines(str(path)) == 7


def test_a_parquet_text_column_that_is_not_strings_rejects_each_row_and_ids_may_be_numbers(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "c.parquet", ["a", "b"], [10, 11], body=[1, 2])
    assert [(i.line, i.reason) for i in read_records(str(path), text_field="body")] == [
        (1, "field 'body' must be a string, got int"),
        (2, "field 'body' must be a string, got int"),
    ]
    assert [(i.id, i.text) for i in read_records(str(path))] == [("10", "a"), ("11", "b")]


def test_a_parquet_file_without_the_text_column_names_it_and_the_columns_there(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "c.parquet", ["a"], ["x"])
    with pytest.raises(InputError) as caught:
        list(read_records(str(path), text_field="body"))
    assert str(caught.value) == f"{path}: no column 'body' (columns: id, text); pass --text-field"


def test_a_damaged_parquet_page_is_one_line_naming_the_file(tmp_path: Path) -> None:
    # given a Parquet file whose third row group has a damaged page header
    path = tmp_path / "damaged.parquet"
    rows = 3000
    table = pa.table({"text": [f"text number {i}" for i in range(rows)], "id": [str(i) for i in range(rows)]})
    pq.write_table(table, path, row_group_size=1000, compression="NONE")
    page = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[page : page + 16] = b"\x0f" * 16
    path.write_bytes(bytes(raw))
    # when it is read, then the error is an InputError of one printable line naming the file
    with pytest.raises(InputError) as caught:
        list(read_records(str(path)))
    message = str(caught.value)
    assert str(path) in message and "unreadable Parquet data" in message
    assert message.isprintable(), repr(message)
