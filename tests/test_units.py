"""Fast unit tests, no processes: readers, batching, the .npy writer, settings, model resolution, resume log."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from producer.job.output import HEADER_BYTES, ChunkRecord, PartialOutput, npy_header
from producer.job.readers import Record, Rejected, read_csv, read_jsonl, read_records, read_txt
from workers.encoder.batching import pack_by_tokens, padded_tokens
from workers.protocol.config import Settings
from workers.protocol.errors import ConfigError, InputError, ModelError
from workers.protocol.model_info import DEFAULT_MODEL_NAME, resolve_model


def _stream(data: bytes) -> io.BufferedReader:
    return io.BufferedReader(io.BytesIO(data))


# -- readers -----------------------------------------------------------------------------------


def test_txt_reader_keeps_every_line_including_empty_ones_and_numbers_them() -> None:
    # given a text file with an empty line, a whitespace-only line and CRLF endings
    data = b"first\r\n\n   \nlast"
    # when it is read
    items = list(read_txt(_stream(data)))
    # then every line is a record, ids are line numbers, and no newline survives
    assert items == [Record(1, "1", "first"), Record(2, "2", ""), Record(3, "3", "   "), Record(4, "4", "last")]


def test_txt_reader_rejects_a_line_that_is_not_utf8_and_goes_on() -> None:
    items = list(read_txt(_stream(b"good\nbad \xff\xfe bytes\nalso good\n")))
    assert isinstance(items[1], Rejected)
    assert items[1].line == 2 and "not valid UTF-8" in items[1].reason
    assert [i.text for i in items if isinstance(i, Record)] == ["good", "also good"]


def test_jsonl_reader_validates_each_record_and_names_its_line() -> None:
    # given one good record, then each kind of bad one, with a blank line between
    lines = [
        json.dumps({"id": "a", "text": "hello"}),
        "",
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": "b"}),
        json.dumps({"id": "c", "text": 42}),
        json.dumps({"id": "d", "text": None}),
        '{"id": "e", "text": "lone \\ud800 surrogate"}',
        json.dumps({"text": "no id"}),
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff"}\n'
    # when it is read
    items = list(read_jsonl(_stream(data), "text", "id"))
    # then valid records keep their ids (else the line number) and each bad one says which line and why
    records = [i for i in items if isinstance(i, Record)]
    rejected = {i.line: i.reason for i in items if isinstance(i, Rejected)}
    assert records == [Record(1, "a", "hello"), Record(9, "9", "no id")]
    assert "not valid JSON" in rejected[3]
    assert "expected a JSON object" in rejected[4]
    assert "missing" in rejected[5]
    assert "must be a string, got int" in rejected[6]
    assert "missing or null" in rejected[7]
    assert "lone surrogate" in rejected[8] and "U+D800" in rejected[8]
    assert "not valid UTF-8" in rejected[10]
    assert 2 not in rejected  # a blank line is no record at all


def test_jsonl_reader_uses_the_fields_it_is_told() -> None:
    data = json.dumps({"key": 7, "body": "text here"}).encode() + b"\n"
    assert list(read_jsonl(_stream(data), "body", "key")) == [Record(1, "7", "text here")]


def test_csv_reader_counts_the_header_as_line_one_and_handles_quoted_newlines() -> None:
    data = b'id,text\nx1,plain\nx2,"two\nlines"\n,no id\nx4,bad \xff\n'
    items = list(read_csv(_stream(data), "text", "id"))
    assert items[0] == Record(2, "x1", "plain")
    assert items[1] == Record(4, "x2", "two\nlines")  # line_num is where the record ends
    assert items[2] == Record(5, "5", "no id")
    assert isinstance(items[3], Rejected) and items[3].line == 6 and "not valid UTF-8" in items[3].reason


def test_csv_reader_without_the_text_column_raises_naming_the_columns() -> None:
    with pytest.raises(InputError, match=r"no column 'text' \(columns: id, body\)"):
        list(read_csv(_stream(b"id,body\n1,x\n"), "text", "id"))


def test_read_records_picks_the_reader_from_the_suffix_and_names_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "a.csv").write_text("text\none\n")
    assert [r.text for r in read_records(str(tmp_path / "a.txt"))] == ["one", "two"]  # type: ignore[union-attr]
    assert [r.text for r in read_records(str(tmp_path / "a.jsonl"))] == ["one"]  # type: ignore[union-attr]
    assert [r.text for r in read_records(str(tmp_path / "a.csv"))] == ["one"]  # type: ignore[union-attr]
    with pytest.raises(InputError, match=r"missing\.jsonl: no such file"):
        list(read_records(str(tmp_path / "missing.jsonl")))
    with pytest.raises(InputError, match="unknown input type"):
        list(read_records(str(tmp_path / "a.doc")))


# -- batching ----------------------------------------------------------------------------------


def test_pack_by_tokens_keeps_every_batch_under_the_budget_and_every_row_once() -> None:
    # given rows of very different lengths, one longer than the budget
    lengths = [5, 300, 7, 64, 64, 1, 128, 33, 2, 90, 700]
    budget = 256
    # when they are packed
    batches = pack_by_tokens(lengths, budget)
    # then each row appears exactly once, rows come out sorted by length,
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)
    # and each batch fits the budget unless it is a single over-long row
    for batch in batches:
        cost = len(batch) * max(lengths[i] for i in batch)
        assert cost <= budget or len(batch) == 1
    assert [700] in [[lengths[i] for i in b] for b in batches]
    assert padded_tokens(lengths, batches) >= sum(lengths)


def test_pack_by_tokens_of_nothing_is_no_batch() -> None:
    assert pack_by_tokens([], 128) == []


# -- output ------------------------------------------------------------------------------------


def test_npy_header_is_exactly_the_reserved_size_and_loads(tmp_path: Path) -> None:
    header = npy_header(123456789, 384)
    assert len(header) == HEADER_BYTES
    path = tmp_path / "empty.npy"
    path.write_bytes(npy_header(0, 8))
    assert np.load(path).shape == (0, 8)


def test_partial_output_written_out_of_order_loads_as_the_ordered_matrix(tmp_path: Path) -> None:
    # given a job whose chunks arrive out of order
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((10, 4)).astype(np.float32)
    out = tmp_path / "out.npy"
    partial = PartialOutput(str(out), 4, "job1")
    for i in range(10):
        partial.add_id(f"id{i}")
    # when chunk 1 (rows 6..9) lands before chunk 0 (rows 0..5), and the job finishes
    partial.write_chunk(ChunkRecord(1, 6, 4, 0, 0, 0, "fp32"), matrix[6:])
    partial.write_chunk(ChunkRecord(0, 0, 6, 0, 0, 0, "fp32"), matrix[:6])
    partial.finish(10, {"rows": 10})
    # then np.load reads exactly the matrix, the manifest lists ids in order, and no partial file is left
    np.testing.assert_array_equal(np.load(out), matrix)
    assert json.loads(Path(f"{out}.manifest.json").read_text())["ids"] == [f"id{i}" for i in range(10)]
    assert not list(tmp_path.glob("*.partial*"))


def test_partial_output_rejects_a_chunk_of_the_wrong_shape(tmp_path: Path) -> None:
    partial = PartialOutput(str(tmp_path / "out.npy"), 4, "job1")
    with pytest.raises(ValueError, match="expected"):
        partial.write_chunk(ChunkRecord(0, 0, 2, 0, 0, 0, "fp32"), np.zeros((2, 3), np.float32))
    partial.discard()


# -- resume log --------------------------------------------------------------------------------


def _interrupted_run(out: Path, job: str) -> None:
    partial = PartialOutput(str(out), 2, job)
    partial.write_chunk(ChunkRecord(0, 0, 1, 3, 3, 0, "fp32"), np.ones((1, 2), np.float32))
    partial.write_chunk(ChunkRecord(1, 1, 1, 4, 4, 1, "fp32"), np.ones((1, 2), np.float32))
    partial.close()


def test_resume_log_of_the_same_job_is_reused(tmp_path: Path) -> None:
    out = tmp_path / "out.npy"
    _interrupted_run(out, "jobA")
    again = PartialOutput(str(out), 2, "jobA")
    assert sorted(again.finished) == [0, 1]
    assert again.finished[1] == ChunkRecord(1, 1, 1, 4, 4, 1, "fp32")
    again.discard()


def test_resume_log_of_another_job_or_width_is_ignored(tmp_path: Path) -> None:
    out = tmp_path / "out.npy"
    _interrupted_run(out, "jobA")
    assert PartialOutput(str(out), 2, "jobB").finished == {}
    _interrupted_run(out, "jobA")
    assert PartialOutput(str(out), 3, "jobA").finished == {}


def test_resume_log_cut_short_by_a_crash_keeps_what_came_before(tmp_path: Path) -> None:
    out = tmp_path / "out.npy"
    _interrupted_run(out, "jobA")
    with open(f"{out}.partial.log", "a", encoding="utf-8") as log:
        log.write('{"chunk": 2, "sta')  # the crash cut this line
    assert sorted(PartialOutput(str(out), 2, "jobA").finished) == [0, 1]


def test_an_automatic_chunk_size_resumes_with_the_chunks_an_earlier_run_cut(tmp_path: Path) -> None:
    from dataclasses import replace

    from producer.job.spec import JobOptions, job_id_for, with_earlier_chunk_rows

    # given a run of 4,000 rows cut into chunks of 667 (two children), stopped after two chunks
    corpus, out = tmp_path / "in.txt", tmp_path / "out.npy"
    corpus.write_text("".join(f"text {i}\n" for i in range(4000)), encoding="utf-8")
    earlier = JobOptions(model=resolve_model(""), chunk_rows=667)
    partial = PartialOutput(str(out), earlier.output_dim, job_id_for(str(corpus), str(out), earlier))
    for chunk in (0, 1):
        record = ChunkRecord(chunk, chunk * 667, 667, 6670, 6670, 0, "fp32")
        partial.write_chunk(record, np.ones((667, earlier.output_dim), np.float32))
    partial.close()
    # when the rerun's own automatic size differs (one child: 1,334 rows)
    rerun = replace(earlier, chunk_rows=1334)
    # then it takes the earlier run's chunks, so that its job id, and the finished chunks, are the same
    resumed = with_earlier_chunk_rows(str(corpus), str(out), rerun)
    assert resumed.chunk_rows == 667
    again = PartialOutput(str(out), earlier.output_dim, job_id_for(str(corpus), str(out), resumed))
    assert sorted(again.finished) == [0, 1]
    again.close()
    # and a rerun that is another job (another dtype), or one with no earlier run, keeps its own size
    assert with_earlier_chunk_rows(str(corpus), str(out), replace(rerun, dtype="bf16")).chunk_rows == 1334
    assert with_earlier_chunk_rows(str(corpus), str(tmp_path / "new.npy"), rerun).chunk_rows == 1334


# -- settings ----------------------------------------------------------------------------------


def test_settings_from_env_reads_typed_values_and_ignores_other_variables() -> None:
    settings = Settings.from_env(
        {
            "EMBEDQ_BATCH_TOKENS": "4096",
            "EMBEDQ_CONCURRENCY": "auto",
            "EMBEDQ_SKIP_MEMORY_CHECK": "yes",
            "EMBEDQ_TASK_TIME_LIMIT_S": "60",
            "EMBEDQ_TASK_SOFT_TIME_LIMIT_S": "50",
            "TESTS_REDIS_URL": "redis://x",
            "PATH": "/bin",
        }
    )
    assert (settings.batch_tokens, settings.concurrency, settings.skip_memory_check) == (4096, None, True)
    assert Settings.from_env(settings.to_env()) == settings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EMBEDQ_BATCH_TOKEN": "10"}, "unknown setting EMBEDQ_BATCH_TOKEN"),
        # No test switch either: faults are played by tests/faults/fault_app.py, never read by workers.
        ({"EMBEDQ_TEST_KILL_ON_TEXT": "x"}, "unknown setting EMBEDQ_TEST_KILL_ON_TEXT"),
        ({"EMBEDQ_BATCH_TOKENS": "many"}, "EMBEDQ_BATCH_TOKENS='many'"),
        ({"EMBEDQ_SKIP_MEMORY_CHECK": "maybe"}, "expected true/false"),
        ({"EMBEDQ_DTYPE": "int8"}, "EMBEDQ_DTYPE='int8'"),
        ({"EMBEDQ_BROKER_URL": "amqp://x"}, "use redis://"),
        ({"EMBEDQ_BATCH_TOKENS": "8"}, "at least 16"),
        ({"EMBEDQ_KEY_PREFIX": "a:b"}, "contain no ':'"),
        ({"EMBEDQ_TASK_TIME_LIMIT_S": "4000"}, "soft limit < hard limit < visibility timeout"),
        ({"EMBEDQ_TASK_SOFT_TIME_LIMIT_S": "1800"}, "soft limit < hard limit"),
        ({"EMBEDQ_TASK_SOFT_TIME_LIMIT_S": "0"}, "0 < soft limit"),
    ],
)
def test_settings_from_env_refuses_bad_values_with_the_variable_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# -- model resolution --------------------------------------------------------------------------


def _bert_folder(folder: Path, **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"model_type": "bert", "hidden_size": 32, "max_position_embeddings": 128}
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    return folder


def test_the_default_model_is_the_packaged_minilm_with_its_own_pooling() -> None:
    info = resolve_model()
    assert (info.name, info.is_local, info.pooling, info.max_length, info.dim) == (
        DEFAULT_MODEL_NAME,
        True,
        "mean",
        256,
        384,
    )


def test_a_folder_without_sentence_transformers_files_uses_mean_and_its_positions(tmp_path: Path) -> None:
    info = resolve_model(str(_bert_folder(tmp_path / "plain")))
    assert (info.name, info.pooling, info.max_length, info.dim) == ("plain", "mean", 128, 32)
    roberta = resolve_model(str(_bert_folder(tmp_path / "rob", model_type="roberta", max_position_embeddings=514)))
    assert roberta.max_length == 512  # two positions are RoBERTa's padding offset


def test_sentence_transformers_pooling_and_length_are_read_from_the_folder(tmp_path: Path) -> None:
    folder = _bert_folder(tmp_path / "st")
    (folder / "modules.json").write_text(
        json.dumps([{"path": "2_Pool", "type": "sentence_transformers.models.Pooling"}])
    )
    (folder / "2_Pool").mkdir()
    (folder / "2_Pool" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    info = resolve_model(str(folder))
    assert (info.pooling, info.max_length) == ("cls", 64)
    # flags win over the folder
    assert resolve_model(str(folder), pooling="max", max_length=100).pooling == "max"


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "message"),
    [
        ("/no/such/model", {}, ModelError, "no such folder"),
        ("./relative/missing", {}, ModelError, "no such folder"),
        ("{tmp}", {}, ModelError, "no config.json"),
        ("{bert}", {"pooling": "sum"}, ConfigError, "choose cls, mean or max"),
        ("{bert}", {"max_length": 1000}, ConfigError, "between 2 and the model's 128 positions"),
        ("{bert}", {"max_length": 1}, ConfigError, "between 2"),
        ("{broken}", {}, ModelError, "cannot read model file"),
        ("{nowidth}", {}, ModelError, "no hidden_size"),
    ],
)
def test_resolve_model_errors_name_the_model_and_the_fix(
    tmp_path: Path, name: str, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    bert = _bert_folder(tmp_path / "bert")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    nowidth = _bert_folder(tmp_path / "nowidth", hidden_size=0)
    path = name.format(tmp=tmp_path, bert=bert, broken=broken, nowidth=nowidth)
    with pytest.raises(error, match=message):
        resolve_model(path, **kwargs)  # type: ignore[arg-type]


# -- extras --------------------------------------------------------------------------------------


def test_a_missing_extra_is_named_with_the_command_that_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.protocol import extras
    from workers.protocol.errors import MissingExtra

    extras.require("embedq serve", "serve", "worker")  # the full install has every extra
    monkeypatch.setitem(extras.EXTRAS, "gpu", ("no_such_module_anywhere",))
    monkeypatch.setitem(extras.EXTRAS, "tpu", ("another_missing_module",))
    with pytest.raises(MissingExtra, match=r"^embedq x needs the gpu extra: pip install 'embedq\[gpu\]'$"):
        extras.require("embedq x", "worker", "gpu")
    with pytest.raises(MissingExtra, match=r"needs the gpu and tpu extras: pip install 'embedq\[gpu,tpu\]'$"):
        extras.require("embedq x", "gpu", "tpu")
