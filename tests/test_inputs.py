"""Every kind of input, good and bad, through the real `embedq embed` command line.

One module-scoped worker (tiny BERT, solo pool) serves the runs that need one; the runs that must
fail before any task is sent use a key prefix no worker listens on, and check that its queue stayed empty.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from producer.cli import exitcodes
from producer.local.embedded_redis import EmbeddedRedis
from tests.conftest import ROOT, Broker, WorkerFactory, run_embedq, wait_until
from workers.encoder import Encoder
from workers.protocol.model_info import resolve_model

SAMPLE = [json.loads(line)["text"].replace("\n", " ") for line in (ROOT / "producer/samples/sample.jsonl").open()][:22]
# Empty and whitespace-only texts are embedded like any other; the long one is truncated and counted.
TEXTS = ["", "   ", "naïve café — ünïcödé ✓", "long " * 300, *SAMPLE]


@dataclass
class Served:
    """A broker prefix with a running tiny-BERT worker, and a way to run `embedq embed` against it."""

    broker: Broker
    model: Path

    def embed(
        self,
        source: str | Path,
        out: Path,
        *extra: str,
        stdin: bytes | None = None,
        prefix: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run_embedq(
            "embed",
            str(source),
            "-o",
            str(out),
            "--broker",
            self.broker.url,
            "--model",
            str(self.model),
            "--chunk-size",
            "4",
            *extra,
            stdin=stdin,
            env={"EMBEDQ_KEY_PREFIX": prefix or self.broker.prefix, **(env or {})},
        )


@pytest.fixture(scope="module")
def served(valkey: EmbeddedRedis, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    broker = Broker(valkey.url, f"t{uuid.uuid4().hex[:10]}", "valkey")
    factory = WorkerFactory(tmp_path_factory.mktemp("inputs-worker"))
    try:
        worker = factory.start(broker.env(model=str(tiny_bert)), pool="solo")
        assert wait_until(lambda: "ready:" in worker.log(), timeout_s=60), worker.log()
        yield Served(broker, tiny_bert)
    finally:
        factory.stop_all()
        broker.cleanup()


@pytest.fixture(scope="module")
def reference(tiny_bert: Path) -> tuple[np.ndarray, int]:
    """The tiny model in-process on TEXTS: rows every format must reproduce, and how many were truncated."""
    result = Encoder.load(resolve_model(str(tiny_bert)), "cpu").encode(TEXTS)
    return result.embeddings, result.truncated


@pytest.fixture
def idle_prefix(served: Served) -> Iterator[str]:
    """A key prefix no worker consumes: whatever is sent under it stays in its queue, for us to see."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield prefix
    Broker(served.broker.url, prefix, "valkey").cleanup()


def _queued(served: Served, prefix: str) -> int:
    client = served.broker.client()
    try:
        # Every model's lanes (workers/protocol/routing.py): `bulk`, `bulk.MODEL`, `interactive`, ...
        lists = [*client.scan_iter(match=f"{prefix}:bulk*"), *client.scan_iter(match=f"{prefix}:interactive*")]
        return sum(int(client.llen(name)) for name in lists)
    finally:
        client.close()


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _nothing_written(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(out.name + "*"))


# -- good input in every format ------------------------------------------------------------------


def _write_input(kind: str, folder: Path) -> tuple[str, bytes | None, list[str]]:
    """The input (path or '-'), what goes to stdin, and the ids the manifest must list."""
    if kind == "txt":
        path = folder / "in.txt"
        path.write_text("".join(t + "\n" for t in TEXTS), encoding="utf-8")
        return str(path), None, [str(i + 1) for i in range(len(TEXTS))]
    if kind == "jsonl":
        _write_jsonl(folder / "in.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)])
        return str(folder / "in.jsonl"), None, [f"d{i}" for i in range(len(TEXTS))]
    if kind == "csv":
        with open(folder / "in.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "text"])
            writer.writerows([f"c{i}", t] for i, t in enumerate(TEXTS))
        return str(folder / "in.csv"), None, [f"c{i}" for i in range(len(TEXTS))]
    if kind == "stdin-txt":
        return "-", "".join(t + "\n" for t in TEXTS).encode(), [str(i + 1) for i in range(len(TEXTS))]
    lines = "".join(json.dumps({"id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS))
    return "-", lines.encode(), [f"s{i}" for i in range(len(TEXTS))]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "stdin-txt", "stdin-jsonl"])
def test_every_input_format_yields_the_reference_rows_ids_and_truncation_count(
    served: Served, reference: tuple[np.ndarray, int], tmp_path: Path, kind: str
) -> None:
    # given the same texts (empty, whitespace-only and over-long ones among them) in this format
    source, stdin, ids = _write_input(kind, tmp_path)
    out = tmp_path / "out.npy"
    # when they are embedded
    result = served.embed(source, out, stdin=stdin)
    # then the rows are the in-process reference, in order, and the manifest counts the truncation
    assert result.returncode == 0, result.stderr
    expected, truncated = reference
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert truncated >= 1
    assert (manifest["rows"], manifest["truncated"], manifest["rejected"]) == (len(TEXTS), truncated, 0)
    assert manifest["ids"] == ids
    assert "docs/s" in result.stdout
    assert not (tmp_path / "out.npy.rejects.jsonl").exists()


def test_parquet_output_has_ids_and_the_same_embeddings_as_npy(served: Served, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    # given one corpus embedded once to .npy and once to .parquet
    source, _, ids = _write_input("jsonl", tmp_path)
    assert served.embed(source, tmp_path / "out.npy").returncode == 0
    result = served.embed(source, tmp_path / "out.parquet")
    assert result.returncode == 0, result.stderr
    # when the Parquet file is read back
    table = pq.read_table(tmp_path / "out.parquet")
    # then it has the columns id and embedding, and the very same rows as the .npy
    assert table.column_names == ["id", "embedding"]
    assert table.column("id").to_pylist() == ids
    matrix = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(matrix, np.load(tmp_path / "out.npy"))
    assert not list(tmp_path.glob("out.parquet.*partial*")) and not (tmp_path / "out.parquet.tmp").exists()


# -- bad records ---------------------------------------------------------------------------------

BAD_RECORDS = {
    "missing-field": (json.dumps({"id": "x", "body": "no text"}), "field 'text' is missing"),
    "not-a-string": (json.dumps({"id": "x", "text": ["a", "list"]}), "must be a string, got list"),
    "not-json": ('{"id": "x", "text": "unterminated', "not valid JSON"),
    "lone-surrogate": ('{"id": "x", "text": "bad \\udc00 half"}', "lone surrogate"),
}


def _corpus_with_bad_line(path: Path, bad: str | bytes, line: int, total: int = 12) -> Path:
    lines = [json.dumps({"id": f"g{i}", "text": f"good text {i}"}).encode() for i in range(total)]
    lines[line - 1] = bad if isinstance(bad, bytes) else bad.encode()
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("kind", [*BAD_RECORDS, "invalid-utf8"])
def test_a_bad_record_fails_the_job_naming_file_and_line_before_any_task_is_sent(
    served: Served, idle_prefix: str, tmp_path: Path, kind: str
) -> None:
    # given a corpus whose third line is bad, in the first chunk
    bad, reason = BAD_RECORDS.get(kind, (b'{"text": "caf\xe9"}', "not valid UTF-8"))
    corpus = _corpus_with_bad_line(tmp_path / "corpus.jsonl", bad, line=3)
    out = tmp_path / "out.npy"
    # when it is embedded with the default --on-invalid fail
    result = served.embed(corpus, out, prefix=idle_prefix)
    # then one line names the file, the line and the reason; the exit code says bad input
    assert result.returncode == exitcodes.INPUT, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{corpus}:3:" in lines[0] and reason in lines[0] and "--on-invalid skip" in lines[0]
    # and nothing was sent, nothing written
    assert _queued(served, idle_prefix) == 0
    assert _nothing_written(out) == []


def test_a_bad_record_after_finished_chunks_leaves_nothing_a_fixed_rerun_could_misuse(
    served: Served, tmp_path: Path
) -> None:
    # given a corpus whose line 70 is bad, long after the first chunks were embedded and written
    corpus = _corpus_with_bad_line(tmp_path / "corpus.jsonl", BAD_RECORDS["not-json"][0], line=70, total=80)
    out = tmp_path / "out.npy"
    # when it is embedded with --on-invalid fail
    result = served.embed(corpus, out, "--max-in-flight", "2")
    # then it fails naming the line, and no output, manifest or partial file is left
    assert result.returncode == exitcodes.INPUT, result.stderr
    assert f"{corpus}:70:" in result.stderr
    assert _nothing_written(out) == []
    # when the input is fixed and the job run again
    _corpus_with_bad_line(corpus, json.dumps({"id": "g69", "text": "good text 69"}), line=70, total=80)
    rerun = served.embed(corpus, out)
    # then it starts over (no chunk reused) and writes every row
    assert rerun.returncode == 0, rerun.stderr
    assert "reused" not in rerun.stdout
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert (manifest["rows"], manifest["reused_chunks"]) == (80, 0)
    assert np.load(out).shape[0] == 80


def test_skip_sets_bad_records_aside_with_line_and_reason_and_goes_on(
    served: Served, tiny_bert: Path, tmp_path: Path
) -> None:
    # given a corpus with one bad record of each kind among good ones
    records: list[str | bytes] = [json.dumps({"id": "g0", "text": "first good"})]
    for bad, _ in BAD_RECORDS.values():
        records += [bad, json.dumps({"id": f"g{len(records)}", "text": f"good {len(records)}"})]
    records.append(b'{"text": "caf\xe9"}')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b"\n".join(r if isinstance(r, bytes) else r.encode() for r in records) + b"\n")
    out = tmp_path / "out.npy"
    # when it is embedded with --on-invalid skip
    result = served.embed(corpus, out, "--on-invalid", "skip")
    # then the job completes with the good records only, in order
    assert result.returncode == 0, result.stderr
    good = [json.loads(r) for r in records if isinstance(r, str) and r.startswith('{"id": "g')]
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["ids"] == [g["id"] for g in good]
    assert (manifest["rows"], manifest["rejected"]) == (len(good), 5)
    expected = Encoder.load(resolve_model(str(tiny_bert)), "cpu").encode([g["text"] for g in good]).embeddings
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    # and each bad record is in OUTPUT.rejects.jsonl with its line and reason
    rejects = [json.loads(line) for line in Path(f"{out}.rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 4, 6, 8, 10]
    reasons = [reason for _, reason in BAD_RECORDS.values()] + ["not valid UTF-8"]
    assert all(expected_reason in r["reason"] for r, expected_reason in zip(rejects, reasons, strict=True))
    assert all(r["source"] == str(corpus) for r in rejects)
    assert "5 rejected" in result.stdout


# -- problems found before anything starts ---------------------------------------------------------


def test_a_missing_input_file_fails_in_one_line_before_any_task_is_sent(
    served: Served, idle_prefix: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.npy"
    result = served.embed(tmp_path / "missing.jsonl", out, prefix=idle_prefix)
    assert result.returncode == exitcodes.INPUT
    assert result.stderr.strip() == f"embedq: error: {tmp_path / 'missing.jsonl'}: no such file"
    assert _queued(served, idle_prefix) == 0 and _nothing_written(out) == []


def test_an_unknown_model_path_fails_in_one_line_before_any_task_is_sent(
    served: Served, idle_prefix: str, tmp_path: Path
) -> None:
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    out = tmp_path / "out.npy"
    result = run_embedq(
        "embed",
        str(corpus),
        "-o",
        str(out),
        "--broker",
        served.broker.url,
        "--model",
        str(tmp_path / "no-such-model"),
        env={"EMBEDQ_KEY_PREFIX": idle_prefix},
    )
    assert result.returncode == exitcodes.MODEL
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-model" in lines[0] and "no such folder" in lines[0]
    assert _queued(served, idle_prefix) == 0 and _nothing_written(out) == []


def test_an_unreachable_broker_fails_in_one_line(tmp_path: Path) -> None:
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    out = tmp_path / "out.npy"
    result = run_embedq("embed", str(corpus), "-o", str(out), "--broker", "redis://:secret@127.0.0.1:1/0")
    assert result.returncode == exitcodes.BROKER
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach Redis at redis://:***@127.0.0.1:1/0" in lines[0]
    assert "secret" not in result.stderr
    assert _nothing_written(out) == []


def test_a_hub_name_offline_fails_in_one_line_without_touching_the_network(
    served: Served, idle_prefix: str, tmp_path: Path
) -> None:
    # given no hub (HF_HUB_OFFLINE=1) and an empty cache, so nothing can be fetched or found
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    out = tmp_path / "out.npy"
    # when a hub name is asked for
    result = run_embedq(
        "embed",
        str(corpus),
        "-o",
        str(out),
        "--broker",
        served.broker.url,
        "--model",
        "org/name",
        env={"EMBEDQ_KEY_PREFIX": idle_prefix, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    # then one clear line says what to do, exit code MODEL, and nothing was sent
    assert result.returncode == exitcodes.MODEL
    assert result.stderr.strip() == (
        "embedq: error: cannot reach the Hugging Face hub for org/name: pass a local folder or unset HF_HUB_OFFLINE"
    )
    assert _queued(served, idle_prefix) == 0 and _nothing_written(out) == []


def test_a_csv_without_the_text_column_names_the_file_and_the_columns(
    served: Served, idle_prefix: str, tmp_path: Path
) -> None:
    corpus = tmp_path / "c.csv"
    corpus.write_text("id,body\n1,hello\n")
    out = tmp_path / "out.npy"
    result = served.embed(corpus, out, prefix=idle_prefix)
    assert result.returncode == exitcodes.INPUT
    assert result.stderr.strip() == f"embedq: error: {corpus}: no column 'text' (columns: id, body); pass --text-field"
    assert _queued(served, idle_prefix) == 0 and _nothing_written(out) == []


def test_a_hub_name_in_the_local_cache_resolves_offline_from_its_json_files(tmp_path: Path) -> None:
    # given an HF cache holding only the small JSON files of org/name (as an earlier online run leaves them)
    snapshot = tmp_path / "hf" / "hub" / "models--org--name" / "snapshots" / ("a" * 40)
    (snapshot / "1_Pooling").mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text(
        json.dumps({"model_type": "bert", "hidden_size": 48, "max_position_embeddings": 128})
    )
    (snapshot / "modules.json").write_text(
        json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    )
    (snapshot / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (snapshot / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    # when the name is resolved with the hub unreachable (offline: no network is tried)
    code = "from workers.protocol.model_info import resolve_model; print(repr(resolve_model('org/name')))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    # then width, pooling and length come from those files, and workers are told to load it by name
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "ModelInfo(name='org/name', path='org/name', is_local=False, pooling='cls', max_length=64, dim=48, "
        "prompts={}, default_prompt_name=None, include_prompt=True)"
    )
