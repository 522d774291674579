"""`embedq embed --long truncate|chunk-mean|chunks` through real worker processes, on a 32-token limit.

One module-scoped solo worker (tiny BERT, torch) serves every run. The reference is computed here, window
by window, with transformers alone: [CLS] + the window's tokens + [SEP], mean-pooled, so that the encoder's
windowing, batching and averaging are checked against something that shares none of their code.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from producer.cli import exitcodes
from producer.client import EmbedClient
from producer.job.output import ChunkRecord
from producer.job.window_output import WindowOutput, unsupported
from producer.local.embedded_redis import EmbeddedRedis
from tests.conftest import Broker, WorkerFactory, run_embedq, wait_until, write_texts_jsonl
from tests.serving import Fleet
from workers.encoder import Encoder
from workers.protocol.long_docs import (
    CHUNK_MEAN,
    CHUNKS,
    TRUNCATE,
    LongPolicyUnsupported,
    check_request_long,
    window_spans,
)
from workers.protocol.model_info import resolve_model

MAX_LENGTH = 32
WINDOW = MAX_LENGTH - 2  # content tokens between [CLS] and [SEP]
TEXTS = [
    "a short sentence",
    "alpha beta " * 40,  # 80 tokens: 4 windows
    "",
    "word " * 30,  # exactly the limit: fits, not split
    "word " * 31,  # one over: 2 windows
    "the quick brown fox jumps over the lazy dog. " * 6,
    "last one",
]


@dataclass
class Served:
    broker: Broker
    model: Path

    def embed(self, corpus: Path, out: Path, *extra: str) -> tuple[int, str]:
        result = run_embedq(
            "embed",
            str(corpus),
            "-o",
            str(out),
            "--broker",
            self.broker.url,
            "--model",
            str(self.model),
            "--max-length",
            str(MAX_LENGTH),
            "--chunk-size",
            "3",
            *extra,
            env={"EMBEDQ_KEY_PREFIX": self.broker.prefix},
        )
        return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def served(valkey: EmbeddedRedis, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    broker = Broker(valkey.url, f"t{uuid.uuid4().hex[:10]}", "valkey")
    factory = WorkerFactory(tmp_path_factory.mktemp("long-worker"))
    try:
        worker = factory.start(broker.env(model=str(tiny_bert), runtime="torch"), pool="solo")
        assert wait_until(lambda: "ready:" in worker.log(), timeout_s=90), worker.log()
        yield Served(broker, tiny_bert)
    finally:
        factory.stop_all()
        broker.cleanup()


@dataclass
class Reference:
    """Per text: its content-token spans and each window's mean-pooled, unnormalised vector."""

    spans: list[list[tuple[int, int]]]
    vectors: list[np.ndarray]

    def chunk_mean(self) -> np.ndarray:
        rows = []
        for spans, vectors in zip(self.spans, self.vectors, strict=True):
            weights = np.array([end - start for start, end in spans], dtype=np.float64)
            # A text that fits (the empty one too, with no token to weigh) is its one window's vector.
            mean = vectors[0] if len(spans) == 1 else (vectors * weights[:, None]).sum(0) / weights.sum()
            rows.append(mean / np.linalg.norm(mean))
        return np.array(rows)


def window_reference(tiny_bert: Path, texts: list[str], window: int) -> Reference:
    """Each text's windows of `window` content tokens, overlapping by a quarter, embedded one by one."""
    import torch
    from transformers import AutoTokenizer, BertModel

    step = window - window // 4
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    model = BertModel.from_pretrained(str(tiny_bert)).eval()
    spans_of, vectors_of = [], []
    for text in texts:
        tokens = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        starts = range(0, max(1, len(tokens) - window + step), step) if len(tokens) > window else [0]
        spans = [(start, min(start + window, len(tokens))) for start in starts]
        vectors = []
        for start, end in spans:
            ids = torch.tensor([[tokenizer.cls_token_id, *tokens[start:end], tokenizer.sep_token_id]])
            with torch.inference_mode():
                hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            vectors.append(hidden[0].mean(0).double().numpy())
        spans_of.append(spans)
        vectors_of.append(np.array(vectors))
    return Reference(spans_of, vectors_of)


@pytest.fixture(scope="module")
def reference(tiny_bert: Path) -> Reference:
    return window_reference(tiny_bert, TEXTS, WINDOW)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_windows_overlap_by_a_quarter_and_end_at_the_text_end() -> None:
    assert window_spans(80, 30) == [(0, 30), (23, 53), (46, 76), (69, 80)]
    assert window_spans(31, 30) == [(0, 30), (23, 31)]
    assert window_spans(30, 30) == [(0, 30)] and window_spans(0, 30) == [(0, 0)]
    # and a worker that predates the policy (it echoes none) is refused rather than silently truncating
    assert unsupported("chunk-mean", {"worker": "w1"}, None).startswith("its worker (w1) does not know --long")
    assert unsupported("chunks", {"long": "chunks"}, None) and not unsupported("truncate", {}, None)
    # and a request (one vector back per text) cannot ask for window rows, an unknown policy, or windows and a prompt
    with pytest.raises(LongPolicyUnsupported, match="one vector per text: use long='chunk-mean'"):
        check_request_long(CHUNKS, None)
    with pytest.raises(LongPolicyUnsupported, match="'sliding': choose one of truncate, chunk-mean"):
        check_request_long("sliding", None)
    with pytest.raises(LongPolicyUnsupported, match="windows take no prompt yet"):
        check_request_long(CHUNK_MEAN, "query: ")
    check_request_long(CHUNK_MEAN, "")
    check_request_long(TRUNCATE, "query: ")


def test_chunk_mean_matches_the_window_by_window_reference_and_short_texts_are_unchanged(
    served: Served, reference: Reference, tmp_path: Path
) -> None:
    # given a corpus of short texts and texts over the 32-token limit
    corpus = write_texts_jsonl(tmp_path / "corpus.jsonl", TEXTS)
    # when it is embedded with --long chunk-mean, and again with the default (truncate)
    code, printed = served.embed(corpus, tmp_path / "mean.npy", "--long", "chunk-mean")
    assert code == 0, printed
    code, printed_truncate = served.embed(corpus, tmp_path / "cut.npy")
    assert code == 0, printed_truncate
    # then every row is the token-weighted mean of its windows' vectors, normalised
    mean, cut = np.load(tmp_path / "mean.npy"), np.load(tmp_path / "cut.npy")
    assert mean.shape == (len(TEXTS), 32)
    assert _cosines(mean, reference.chunk_mean()).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(mean, axis=1), 1.0, atol=1e-5)
    # and texts that fit are what truncate gives them; split ones differ from their truncated row
    split = [i for i, spans in enumerate(reference.spans) if len(spans) > 1]
    assert split == [1, 4, 5]
    fits = [i for i in range(len(TEXTS)) if i not in split]
    np.testing.assert_allclose(mean[fits], cut[fits], atol=1e-6)
    assert _cosines(mean[split], cut[split]).max() < 0.9999
    # and the manifests record the policy and what it split
    manifest = json.loads((tmp_path / "mean.npy.manifest.json").read_text())
    windows = sum(len(reference.spans[i]) for i in split)
    assert (manifest["long"], manifest["split_docs"], manifest["split_windows"]) == ("chunk-mean", 3, windows)
    assert manifest["truncated"] == 0 and manifest["rows"] == len(TEXTS)
    assert f"3 split into {windows} windows" in printed
    manifest = json.loads((tmp_path / "cut.npy.manifest.json").read_text())
    assert (manifest["long"], manifest["split_docs"], manifest["truncated"]) == ("truncate", 0, 3)


def test_chunks_writes_one_parquet_row_per_window_in_document_order(
    served: Served, reference: Reference, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    # given the same corpus
    corpus = write_texts_jsonl(tmp_path / "corpus.jsonl", TEXTS)
    # when it is embedded with --long chunks
    code, printed = served.embed(corpus, tmp_path / "windows.parquet", "--long", "chunks")
    assert code == 0, printed
    # then there is one row per window, in document order, with the document's id and its token span
    table = pq.read_table(tmp_path / "windows.parquet")
    assert table.column_names == ["id", "window", "token_start", "token_end", "embedding"]
    expected = [
        (f"doc-{doc}", window, start, end)
        for doc, spans in enumerate(reference.spans)
        for window, (start, end) in enumerate(spans)
    ]
    got = list(
        zip(*(table.column(name).to_pylist() for name in ("id", "window", "token_start", "token_end")), strict=True)
    )
    assert got == expected
    # and each window's vector is that window embedded alone
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    alone = np.concatenate(reference.vectors)
    assert _cosines(vectors, alone).min() >= 0.99999
    # and the manifest counts documents, split ones, and rows
    manifest = json.loads((tmp_path / "windows.parquet.manifest.json").read_text())
    assert (manifest["long"], manifest["rows"], manifest["window_rows"]) == ("chunks", len(TEXTS), len(expected))
    assert manifest["ids"] == [f"doc-{i}" for i in range(len(TEXTS))]
    assert not list(tmp_path.glob("windows.parquet.partial*"))


def test_chunks_with_npy_output_is_refused_in_one_line(served: Served, tmp_path: Path) -> None:
    corpus = write_texts_jsonl(tmp_path / "corpus.jsonl", TEXTS[:2])
    code, printed = served.embed(corpus, tmp_path / "out.npy", "--long", "chunks")
    assert code == exitcodes.USAGE, printed
    line = printed.strip().splitlines()[-1]
    assert "--long chunks" in line and ".parquet" in line
    assert not list(tmp_path.glob("out.npy*"))


def test_short_texts_take_the_very_same_path_in_process(tiny_bert: Path) -> None:
    # given texts that all fit: chunk-mean and chunks must not change a single bit of them
    encoder = Encoder.load(resolve_model(str(tiny_bert), max_length=MAX_LENGTH), "cpu", runtime="torch")
    texts = [TEXTS[0], TEXTS[2], TEXTS[3], TEXTS[6]]
    truncated = encoder.encode(texts, max_length=MAX_LENGTH)
    for policy in ("chunk-mean", "chunks"):
        result = encoder.encode(texts, max_length=MAX_LENGTH, long=policy)
        assert np.array_equal(result.embeddings, truncated.embeddings), policy
        assert (result.split, result.windows, result.truncated) == (0, 0, 0)
    table = encoder.encode(texts, max_length=MAX_LENGTH, long="chunks").window_table
    assert table is not None and table[:, :2].tolist() == [[0, 0], [1, 0], [2, 0], [3, 0]]


def _record(chunk: int, start: int, rows: int, split: int = 0, windows: int = 0) -> ChunkRecord:
    return ChunkRecord(chunk, start, rows, 10, 10, 0, "fp32", split, windows)


def test_window_output_resumes_cuts_an_unlogged_tail_and_writes_document_order(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = str(tmp_path / "w.parquet")
    dim = 3
    # given chunk 1 (docs 2-3, doc 3 split in 2 windows) arriving before chunk 0 (docs 0-1)
    partial = WindowOutput(out, dim, "job1")
    partial.add_id("a")
    partial.add_id("b")
    partial.add_id("c")
    partial.add_id("d")
    second = np.arange(9, dtype=np.float32).reshape(3, dim) + 100
    partial.write_chunk(_record(1, 2, 2, 1, 2), second, np.array([[0, 0, 0, 4], [1, 0, 0, 30], [1, 1, 23, 40]]))
    # and a crash after more bytes were appended but before their log line
    with open(partial.data_path, "ab") as data, open(partial.windows_path, "ab") as table:
        data.write(b"\1" * 24)
        table.write(b"\1" * 16)
    partial.close()
    # when the same job runs again
    again = WindowOutput(out, dim, "job1")
    # then chunk 1 is reused at its offset, the tail is gone, and chunk 0 is appended after it
    assert list(again.finished) == [1] and again.offsets == {1: 0}
    for record_id in "abcd":
        again.add_id(record_id)
    first = np.arange(6, dtype=np.float32).reshape(2, dim)
    again.write_chunk(_record(0, 0, 2), first, np.array([[0, 0, 0, 3], [1, 0, 0, 5]]))
    assert again.offsets == {1: 0, 0: 3}
    again.finish(4, {"job": "job1"})
    # and the Parquet file lists the windows in document order
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == ["a", "b", "c", "d", "d"]
    assert table.column("window").to_pylist() == [0, 0, 0, 0, 1]
    assert table.column("token_start").to_pylist() == [0, 0, 0, 0, 23]
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist()), np.concatenate([first, second]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.parquet", "w.parquet.manifest.json"]


#: Over the tiny BERT's own limit (128 positions): requests have no --max-length, they get the model's.
#: Each long text changes after its first window, so that its windows' mean is far from its truncated row.
LONG_TEXTS = [
    "a short sentence",
    "alpha beta " * 60 + "gamma delta " * 60,
    "the quick brown fox jumps over the lazy dog. " * 10 + "pack my box with five dozen liquor jugs. " * 10,
]


def test_the_clients_and_the_gateway_embed_long_texts_in_windows_as_the_command_does(
    served: Served, tiny_bert: Path, tmp_path: Path
) -> None:
    import openai

    info = resolve_model(str(tiny_bert))
    reference = window_reference(tiny_bert, LONG_TEXTS, info.max_length - 2)
    split = [i for i, spans in enumerate(reference.spans) if len(spans) > 1]
    assert split == [1, 2]
    settings = served.broker.settings(model=str(tiny_bert))
    # given a Python client, and a gateway on the same worker (its cache on, as by default)
    fleet = Fleet(served.broker.url, tiny_bert, tmp_path, prefix=served.broker.prefix)
    try:
        base = fleet.start_gateway("--timeout", "60")
        api = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=90)
        with EmbedClient(settings=settings) as client:
            # when the client asks for chunk-mean, and then for the default
            mean = client.embed(LONG_TEXTS, timeout=60, long=CHUNK_MEAN)
            cut = client.embed(LONG_TEXTS, timeout=60)
            # then the long texts are the token-weighted mean of their windows, the short one is unchanged
            assert _cosines(mean, reference.chunk_mean()).min() >= 0.99999
            np.testing.assert_allclose(mean[0], cut[0], atol=1e-6)
            assert _cosines(mean[split], cut[split]).max() < 0.9999
            # and a policy a request cannot get is refused before anything is sent
            with pytest.raises(LongPolicyUnsupported, match="one vector per text"):
                client.embed(LONG_TEXTS, long=CHUNKS)

        def gateway(**extra: object) -> np.ndarray:
            response = api.embeddings.create(input=LONG_TEXTS, model=info.name, encoding_format="float", **extra)  # type: ignore[arg-type]
            return np.array([row.embedding for row in response.data], dtype=np.float32)

        # when the openai package sends the default first (so that its vectors are cached), then `long` as an
        # extra field
        gateway_cut = gateway()
        gateway_mean = gateway(extra_body={"long": CHUNK_MEAN})
        # then each is what the client got: the cache keeps the two policies apart
        np.testing.assert_allclose(gateway_cut, cut, atol=1e-5)
        np.testing.assert_allclose(gateway_mean, mean, atol=1e-5)
        # and a policy the gateway cannot answer is one 400 naming the field
        with pytest.raises(openai.BadRequestError, match="one vector per text") as refused:
            gateway(extra_body={"long": CHUNKS})
        assert (refused.value.body["param"], refused.value.body["code"]) == ("long", "long_unsupported")  # type: ignore[index]
        with pytest.raises(openai.BadRequestError, match="'long' must be a string"):
            gateway(extra_body={"long": 3})
    finally:
        fleet.stop()
