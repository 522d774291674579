"""Parquet input and quantised output through the real `embedq embed` command line and a real worker.

One module-scoped worker (tiny BERT, solo pool). The quantised output is compared with
sentence-transformers' `quantize_embeddings` on the float32 output of the same corpus, calibrated on all
of it; tests/test_quantize.py covers every precision and resuming without processes.
"""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.cli import exitcodes
from producer.job.quantize import quantize_queries
from producer.local.embedded_redis import EmbeddedRedis
from tests.conftest import ROOT, Broker, WorkerFactory, run_embedq, wait_until

SAMPLE = [json.loads(line)["text"] for line in (ROOT / "producer/samples/sample.jsonl").open()][:14]


@pytest.fixture(scope="module")
def broker(valkey: EmbeddedRedis, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    served = Broker(valkey.url, f"t{uuid.uuid4().hex[:10]}", "valkey")
    factory = WorkerFactory(tmp_path_factory.mktemp("parquet-worker"))
    try:
        worker = factory.start(served.env(model=str(tiny_bert)), pool="solo")
        assert wait_until(lambda: "ready:" in worker.log(), timeout_s=60), worker.log()
        yield served
    finally:
        factory.stop_all()
        served.cleanup()


def _embed(broker: Broker, model: Path, source: Path, out: Path, *extra: str, prefix: str | None = None) -> None:
    result = run_embedq(
        "embed",
        str(source),
        "-o",
        str(out),
        "--broker",
        broker.url,
        "--model",
        str(model),
        "--chunk-size",
        "4",
        *extra,
        env={"EMBEDQ_KEY_PREFIX": prefix or broker.prefix},
    )
    assert result.returncode == 0, result.stderr


def test_a_parquet_corpus_embeds_to_int8_parquet_equal_to_sentence_transformers_on_the_float_rows(
    broker: Broker, tiny_bert: Path, tmp_path: Path
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers.quantization import quantize_embeddings

    # given a Parquet corpus in row groups of 5, with one null text among the rows
    texts: list[str | None] = list(SAMPLE)
    texts[2] = None
    corpus = tmp_path / "corpus.parquet"
    table = pa.table({"doc": [f"d{i}" for i in range(len(texts))], "body": texts})
    pq.write_table(table, corpus, row_group_size=5)
    fields = ("--text-field", "body", "--id-field", "doc", "--on-invalid", "skip")
    # when it is embedded once as float32 and once as int8 Parquet
    _embed(broker, tiny_bert, corpus, tmp_path / "float.npy", *fields)
    _embed(broker, tiny_bert, corpus, tmp_path / "int8.parquet", *fields, "--precision", "int8")
    # then the int8 rows are sentence-transformers' int8 of the float rows, calibrated on the whole job
    floats = np.load(tmp_path / "float.npy")
    assert floats.shape[0] == len(texts) - 1
    out = pq.read_table(tmp_path / "int8.parquet")
    column = out.column("embedding").combine_chunks()
    assert column.type.value_type == pa.int8()
    got = column.values.to_numpy().reshape(-1, floats.shape[1])
    np.testing.assert_array_equal(got, quantize_embeddings(floats, "int8", calibration_embeddings=floats))
    # and the ids are the doc column's, without the rejected row (set aside with its row number)
    ids = [f"d{i}" for i in range(len(texts)) if i != 2]
    assert out.column("id").to_pylist() == ids
    rejects = [json.loads(line) for line in Path(f"{tmp_path / 'int8.parquet'}.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(3, "field 'body' is missing or null")]
    # and the manifest's ranges quantise a query on the corpus' scale
    manifest = json.loads(Path(f"{tmp_path / 'int8.parquet'}.manifest.json").read_text())
    assert (manifest["precision"], manifest["ids"], manifest["rejected"]) == ("int8", ids, 1)
    np.testing.assert_array_equal(quantize_queries(floats[:2], manifest), got[:2])


def test_a_parquet_corpus_without_the_text_column_fails_in_one_line_naming_the_columns(
    broker: Broker, tiny_bert: Path, tmp_path: Path
) -> None:
    # given a Parquet file whose text is in a column named otherwise
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": ["a"], "body": ["hello"]}), corpus)
    # when it is embedded with the default --text-field
    result = run_embedq(
        "embed", str(corpus), "-o", str(tmp_path / "out.npy"), "--broker", broker.url, "--model", str(tiny_bert)
    )
    # then one line names the file, the column asked for and the columns there are (bad input)
    assert result.returncode == exitcodes.INPUT, result.stderr
    assert result.stderr.strip() == f"embedq: error: {corpus}: no column 'text' (columns: id, body); pass --text-field"
    assert not list(tmp_path.glob("out.npy*"))
