"""The packaged all-MiniLM-L6-v2 through real workers equals sentence-transformers, row for row.

One module-scoped worker (prefork, two children) serves the packaged model; each run of the real
`embedq embed` command line is compared with sentence-transformers or with the in-process Encoder.
The same suite runs every kept inference runtime in process, on MiniLM and on a tiny BERT, against
sentence-transformers: fp32 must match to a cosine of 0.99999, bf16 to 0.9999.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from producer.local.embedded_redis import EmbeddedRedis
from tests.conftest import ROOT, Broker, WorkerFactory, run_embedq, wait_until
from workers.encoder import Encoder, cpu_has_bf16
from workers.protocol.model_info import default_model_path, resolve_model

SAMPLE = ROOT / "producer" / "samples" / "sample.jsonl"
ROWS = 300  # a few hundred real sentences: short and long, punctuation, quotes, numbers
LONG = 4  # of which this many are whole long fortunes, truncated at the model's 256 tokens


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A few hundred real sentences cut from the fortunes, and the longest fortunes whole (over 256 tokens)."""
    fortunes = [json.loads(line)["text"] for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    sentences = [s.strip() for text in fortunes for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) >= 20]
    texts = sentences[: ROWS - LONG] + sorted(fortunes, key=len)[-LONG:]
    path = tmp_path_factory.mktemp("equivalence") / "fortunes.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path, texts


@pytest.fixture(scope="module")
def minilm_broker(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker prefix served by a prefork worker with two children, each loading the packaged MiniLM."""
    broker = Broker(valkey.url, f"t{uuid.uuid4().hex[:10]}", "valkey")
    factory = WorkerFactory(tmp_path_factory.mktemp("minilm-worker"))
    try:
        worker = factory.start(broker.env(), concurrency=2)
        assert wait_until(lambda: worker.log().count("ready:") == 2, timeout_s=120), worker.log()
        yield broker
    finally:
        factory.stop_all()
        broker.cleanup()


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.load(resolve_model(), "cpu")


#: Every kept runtime and dtype (bf16 only where the CPU has it natively: elsewhere OpenVINO refuses it).
RUNTIMES = [
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("openvino", "fp32"),
    *([("openvino", "bf16")] if cpu_has_bf16() else []),
    ("onnxruntime", "fp32"),
]
MIN_COSINE = {"fp32": 0.99999, "bf16": 0.9999}


def _sentence_transformers(folder: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode(texts, normalize_embeddings=True, batch_size=64, convert_to_numpy=True)


@pytest.fixture(scope="module")
def minilm_reference(corpus: tuple[Path, list[str]]) -> np.ndarray:
    return _sentence_transformers(default_model_path(), corpus[1])


@pytest.fixture(scope="module")
def conversions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion cache for the module: each model is converted once per runtime."""
    return tmp_path_factory.mktemp("conversions")


@pytest.mark.parametrize(("runtime", "dtype"), RUNTIMES)
def test_every_runtime_matches_sentence_transformers_on_minilm(
    corpus: tuple[Path, list[str]], minilm_reference: np.ndarray, conversions: Path, runtime: str, dtype: str
) -> None:
    # given the packaged MiniLM loaded in this runtime (converted from its folder on first load)
    encoder = Encoder.load(resolve_model(), "cpu", runtime=runtime, dtype=dtype, cache_dir=str(conversions))
    assert encoder.runtime_name == runtime
    # when it embeds a few hundred real sentences, long ones truncated, in the token-budget batches
    result = encoder.encode(corpus[1], dtype=dtype, max_length=encoder.info.max_length)
    # then every row points where sentence-transformers' does
    cosines = _cosines(result.embeddings, minilm_reference)
    assert cosines.min() >= MIN_COSINE[dtype], f"worst row {int(cosines.argmin())}: cosine {cosines.min():.7f}"
    assert (result.dtype, result.truncated) == (dtype, LONG)
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("runtime", "dtype"), RUNTIMES)
def test_every_runtime_matches_sentence_transformers_on_a_tiny_bert(
    tiny_bert: Path, corpus: tuple[Path, list[str]], conversions: Path, runtime: str, dtype: str
) -> None:
    # given a tiny random BERT (no sentence-transformers files: mean pooling, 128 positions) in this runtime
    texts = corpus[1][:64] + ["", "   ", "word " * 300]
    info = resolve_model(str(tiny_bert))
    encoder = Encoder.load(info, "cpu", runtime=runtime, dtype=dtype, cache_dir=str(conversions))
    # when it embeds real sentences, empty ones and one longer than the model
    rows = encoder.encode(texts, dtype=dtype).embeddings
    # then it matches sentence-transformers on the same folder
    cosines = _cosines(rows, _sentence_transformers(tiny_bert, texts))
    assert cosines.min() >= MIN_COSINE[dtype], f"worst row {int(cosines.argmin())}: cosine {cosines.min():.7f}"
    # and every pooling, normalised or not, matches the torch reference (pooling is the backend's own code)
    reference = Encoder.load(info, "cpu")
    for pooling, normalize in (("cls", True), ("max", True), ("mean", False)):
        got = encoder.encode(texts, pooling=pooling, normalize=normalize, dtype=dtype).embeddings
        expected = reference.encode(texts, pooling=pooling, normalize=normalize, dtype=dtype).embeddings
        assert _cosines(got, expected).min() >= MIN_COSINE[dtype], (pooling, normalize)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(expected, axis=1), rtol=1e-2)


SMALL = 32  # the pooling code, not the corpus, is under test in the flag tests


@pytest.fixture(scope="module")
def small(
    corpus: tuple[Path, list[str]], encoder: Encoder, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[str], np.ndarray]:
    """A few real sentences as a corpus file, their texts, and their default (mean, normalised) rows."""
    texts = corpus[1][:SMALL]
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path, texts, encoder.encode(texts).embeddings


def _embed(broker: Broker, source: Path, out: Path, *extra: str) -> tuple[np.ndarray, dict[str, object]]:
    result = run_embedq(
        "embed",
        str(source),
        "-o",
        str(out),
        "--broker",
        broker.url,
        "--chunk-size",
        "32",
        "--dtype",
        "fp32",
        *extra,
        env={"EMBEDQ_KEY_PREFIX": broker.prefix},
    )
    assert result.returncode == 0, result.stderr
    return np.load(out), json.loads(Path(f"{out}.manifest.json").read_text())


def test_workers_output_equals_sentence_transformers_on_real_sentences(
    minilm_broker: Broker, corpus: tuple[Path, list[str]], tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    # given a few hundred real sentences
    source, texts = corpus
    # when the workers embed them with the default model and settings
    matrix, manifest = _embed(minilm_broker, source, tmp_path / "out.npy")
    # then every row matches sentence-transformers' normalised encoding of the same folder
    model = SentenceTransformer(str(default_model_path()), device="cpu")
    expected = model.encode(texts, normalize_embeddings=True, batch_size=64, convert_to_numpy=True)
    assert matrix.dtype == np.float32 and matrix.shape == expected.shape == (ROWS, 384)
    cosines = _cosines(matrix, expected)
    assert cosines.min() >= 0.99999, f"worst row {int(cosines.argmin())}: cosine {cosines.min():.7f}"
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    # and the manifest describes what was done, including the texts sentence-transformers also truncates
    assert (manifest["model"], manifest["dim"], manifest["pooling"], manifest["max_length"]) == (
        "all-MiniLM-L6-v2",
        384,
        "mean",
        model.max_seq_length,
    )
    assert (manifest["normalize"], manifest["dtype"], manifest["rows"]) == (True, "fp32", ROWS)
    too_long = sum(len(model.tokenizer(t.strip())["input_ids"]) > model.max_seq_length for t in texts)
    assert manifest["truncated"] == too_long == LONG


@pytest.mark.parametrize(
    ("flags", "pooling", "normalize"),
    [(["--pooling", "cls"], "cls", True), (["--pooling", "max"], "max", True), (["--no-normalize"], "mean", False)],
)
def test_pooling_and_normalize_flags_do_what_they_say(
    minilm_broker: Broker,
    small: tuple[Path, list[str], np.ndarray],
    encoder: Encoder,
    tmp_path: Path,
    flags: list[str],
    pooling: str,
    normalize: bool,
) -> None:
    # given real sentences
    source, texts, default = small
    # when the workers embed them with the flag
    matrix, manifest = _embed(minilm_broker, source, tmp_path / "out.npy", *flags)
    # then the rows are the in-process Encoder's with that pooling and normalisation
    expected = encoder.encode(texts, pooling=pooling, normalize=normalize).embeddings
    np.testing.assert_allclose(matrix, expected, rtol=1e-5, atol=1e-5)
    assert (manifest["pooling"], manifest["normalize"]) == (pooling, normalize)
    norms = np.linalg.norm(matrix, axis=1)
    if normalize:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
        # and the flag changed something: these are not the default mean-pooled rows
        assert _cosines(matrix, default).min() < 0.999
    else:
        # raw mean-pooled MiniLM vectors are far from unit length, and point where the normalised ones do
        assert np.abs(norms - 1.0).min() > 0.01
        np.testing.assert_allclose(matrix / norms[:, None], default, atol=1e-5)


def test_bf16_through_the_workers_is_close_and_the_user_hears_once_when_it_runs_emulated(
    minilm_broker: Broker, small: tuple[Path, list[str], np.ndarray], tmp_path: Path
) -> None:
    # given real sentences in chunks of 8 (four chunks, so a per-chunk message would show four times)
    source, texts, exact = small
    out = tmp_path / "bf16.npy"
    # when a user asks the workers for bf16
    result = run_embedq(
        "embed", str(source), "-o", str(out), "--broker", minilm_broker.url, "--chunk-size", "8", "--dtype", "bf16",
        env={"EMBEDQ_KEY_PREFIX": minilm_broker.prefix},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # then the rows are within bf16's bar of the exact ones, and the manifest says bf16
    assert _cosines(np.load(out), exact).min() >= MIN_COSINE["bf16"]
    assert json.loads(Path(f"{out}.manifest.json").read_text())["dtype"] == "bf16"
    # and on a CPU without native bf16 (emulated, several times slower than fp32) the command says so once,
    # naming what to use instead; on one with it, nothing is said
    said = result.stderr.count("runs emulated")
    if cpu_has_bf16():
        assert said == 0, result.stderr
    else:
        assert said == 1 and "use --dtype auto" in result.stderr, result.stderr


def test_a_folder_without_sentence_transformers_files_uses_mean_and_the_models_positions(
    encoder: Encoder, tmp_path: Path
) -> None:
    # given the packaged MiniLM without its sentence-transformers files (modules.json, 1_Pooling, ...)
    source = default_model_path()
    plain = tmp_path / "plain-minilm"
    plain.mkdir()
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ):
        (plain / name).symlink_to(source / name)
    # when it is resolved
    info = resolve_model(str(plain))
    # then pooling falls back to mean and the length limit to the model's 512 positions (not ST's 256)
    assert (info.pooling, info.max_length, info.dim) == ("mean", 512, 384)
    assert encoder.info.max_length == 256
    # and encoding with it is mean pooling: equal to the packaged model on texts shorter than both limits
    texts = ["a short sentence", "another one, a little longer than the first"]
    plain_rows = Encoder.load(info, "cpu").encode(texts).embeddings
    np.testing.assert_allclose(plain_rows, encoder.encode(texts).embeddings, atol=1e-6)
