"""Prompts, Matryoshka dimensions and request deadlines, end to end against sentence-transformers.

One module-scoped fleet: a real worker serving a tiny sentence-transformers folder that this module
builds (a 2-layer BERT + a mean Pooling with `include_prompt=False`, prompts "query"/"doc", default
"query"), a real gateway driven by the `openai` package, the Python client, and `embedq embed`.
Every vector is compared with `SentenceTransformer.encode` loaded from the same folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
from sentence_transformers import SentenceTransformer

from producer.serve.client import EmbedClient
from tests.conftest import Broker, run_embedq, wait_until, write_texts_jsonl
from tests.serving import Fleet, http
from workers.encoder import Encoder
from workers.protocol import model_registry
from workers.protocol.dimensions import DimensionsUnsupported
from workers.protocol.errors import RequestTimeout
from workers.protocol.keys import Keys
from workers.protocol.model_info import resolve_model
from workers.protocol.prompts import UnknownPrompt

TEXTS = ["The cat sat on the mat.", "", "  leading and trailing spaces  ", "naïve café ünïcode ✓", "word " * 40]
PROMPTS = {"query": "query: ", "doc": "Represent this passage for retrieval: "}
MIN_COS = 0.99999
#: The gateway's request timeout: short, for the deadline test; still far above what the tiny model takes.
GATEWAY_TIMEOUT_S = 3
#: Below the tiny BERT's 128 positions: ST >= 5 keeps it as the tokenizer's model_max_length.
MAX_SEQ_LENGTH = 48


def build_st_folder(bert: Path, folder: Path, *, pooling: str, include_prompt: bool) -> Path:
    """A sentence-transformers folder saved by sentence-transformers itself: `bert` + Pooling, with prompts."""
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(str(bert), max_seq_length=MAX_SEQ_LENGTH)  # the last text is truncated
    pool = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling, include_prompt=include_prompt)
    model = SentenceTransformer(modules=[transformer, pool], prompts=PROMPTS, default_prompt_name="query", device="cpu")
    model.save(str(folder))
    return folder


def cosines(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    return np.asarray((ours / np.linalg.norm(ours, axis=1, keepdims=True) * ref).sum(1))


@pytest.fixture(scope="module")
def st_folder(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_st_folder(
        tiny_bert, tmp_path_factory.mktemp("st") / "tiny-st-prompts", pooling="mean", include_prompt=False
    )


@pytest.fixture(scope="module")
def st(st_folder: Path) -> SentenceTransformer:
    return SentenceTransformer(str(st_folder), device="cpu")


@pytest.fixture(scope="module")
def fleet(valkey: object, st_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    serving = Fleet(valkey.url, st_folder, tmp_path_factory.mktemp("prompts"))  # type: ignore[attr-defined]
    try:
        log = serving.start_worker(wait=False)  # the gateway starts while the worker loads its model
        serving.base = serving.start_gateway("--timeout", str(GATEWAY_TIMEOUT_S))  # type: ignore[attr-defined]
        serving.wait_ready(log)
        yield serving
    finally:
        serving.stop()
        Broker(valkey.url, serving.prefix, "valkey").cleanup()  # type: ignore[attr-defined]


def api(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.base}/v1", api_key="unused", max_retries=0, timeout=60)  # type: ignore[attr-defined]


def metric(fleet: Fleet, name: str) -> float:
    """One sample of the gateway's /metrics (0 when absent), e.g. 'embedq_docs_total'."""
    status, text = http("GET", f"{fleet.base}/metrics")  # type: ignore[attr-defined]
    assert status == 200
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_the_folder_s_prompts_and_pooling_are_read_without_torch_and_announced(fleet: Fleet, st_folder: Path) -> None:
    # given the folder sentence-transformers saved (its Pooling in the `pooling_mode` form of ST >= 5)
    info = resolve_model(str(st_folder))
    # then its prompts, default and include_prompt are read, and the worker announced them for light producers
    assert (info.pooling, info.include_prompt, info.default_prompt_name) == ("mean", False, "query")
    assert info.max_length == MAX_SEQ_LENGTH
    assert info.prompts["query"] == PROMPTS["query"] and info.prompts["doc"] == PROMPTS["doc"]
    redis_client = Broker(fleet.broker_url, fleet.prefix, "valkey").client()
    announced = model_registry.lookup(redis_client, Keys(fleet.prefix), info.name)
    redis_client.close()
    assert announced is not None
    assert (announced.prompts, announced.default_prompt_name, announced.include_prompt) == (
        info.prompts,
        "query",
        False,
    )


def test_the_client_matches_sentence_transformers_prompts_and_the_cache_keeps_them_apart(
    fleet: Fleet, st: SentenceTransformer
) -> None:
    with EmbedClient(settings=fleet.settings, cache=True) as client:
        # when the client asks for a named prompt, for the folder's default, and for no prompt at all
        doc = client.embed(TEXTS, prompt_name="doc")
        default = client.embed(TEXTS)
        bare = client.embed(TEXTS, prompt="")
        # then each equals sentence-transformers' encode with the same prompt (the cache never mixes them up)
        assert cosines(doc, st.encode(TEXTS, prompt_name="doc")).min() >= MIN_COS
        assert cosines(default, st.encode(TEXTS)).min() >= MIN_COS  # default_prompt_name "query"
        assert cosines(bare, st.encode(TEXTS, prompt="")).min() >= MIN_COS
        assert cosines(doc, default).min() < 0.999  # the prompts really differ
        # and a repeat comes from the cache, keyed by prompt
        hits = client.stats["cache_hits"]
        np.testing.assert_array_equal(client.embed(TEXTS, prompt_name="doc"), doc)
        assert client.stats["cache_hits"] == hits + len(TEXTS)
        assert client.embed(TEXTS, prompt_name="doc", dimensions=8).shape == (len(TEXTS), 8)  # keyed by width too
        # an unknown name fails at once, listing the folder's names
        with pytest.raises(UnknownPrompt, match="declares these prompts: doc, document, query"):
            client.embed(TEXTS, prompt_name="passage")
        with pytest.raises(DimensionsUnsupported, match="makes 32-dimensional vectors; ask for 1 to 32"):
            client.embed(TEXTS, dimensions=33)


def test_include_prompt_false_leaves_the_prompt_out_of_pooling_as_sentence_transformers_does(
    st_folder: Path, st: SentenceTransformer
) -> None:
    # given the same folder in-process, and the vectors ST makes when the prompt is pooled too
    encoder = Encoder.load(resolve_model(str(st_folder)), "cpu")
    ours = encoder.encode(TEXTS, prompt=PROMPTS["doc"]).embeddings
    included = SentenceTransformer(str(st_folder), device="cpu")
    included[1].include_prompt = True
    # then embedq matches include_prompt=False, which is measurably not include_prompt=True
    assert cosines(ours, st.encode(TEXTS, prompt_name="doc")).min() >= MIN_COS
    assert cosines(ours, included.encode(TEXTS, prompt_name="doc")).min() < 0.999


@pytest.mark.parametrize(("pooling", "include_prompt"), [("cls", False), ("max", False)])
def test_every_pooling_matches_sentence_transformers_with_a_prompt(
    tiny_bert: Path, tmp_path: Path, pooling: str, include_prompt: bool
) -> None:
    folder = build_st_folder(tiny_bert, tmp_path / "st", pooling=pooling, include_prompt=include_prompt)
    info = resolve_model(str(folder))
    encoder = Encoder.load(info, "cpu")
    reference = SentenceTransformer(str(folder), device="cpu", truncate_dim=8)
    # cut, then normalised (unit length) ...
    ours = encoder.encode(TEXTS, pooling=info.pooling, prompt=PROMPTS["doc"], dimensions=8).embeddings
    assert cosines(ours, reference.encode(TEXTS, prompt_name="doc", normalize_embeddings=True)).min() >= MIN_COS
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # ... or just cut with normalize=False (--no-normalize)
    raw = encoder.encode(TEXTS, pooling=info.pooling, prompt=PROMPTS["doc"], dimensions=8, normalize=False)
    np.testing.assert_allclose(raw.embeddings, reference.encode(TEXTS, prompt_name="doc"), rtol=1e-4, atol=1e-5)


def test_the_openai_package_gets_prompt_name_and_dimensions(fleet: Fleet, st_folder: Path) -> None:
    model = resolve_model(str(st_folder)).name
    # when the openai package sends dimensions= and prompt_name through extra_body
    response = api(fleet).embeddings.create(
        input=TEXTS, model=model, dimensions=12, encoding_format="float", extra_body={"prompt_name": "doc"}
    )
    vectors = np.array([row.embedding for row in response.data], dtype=np.float32)
    # then they are ST's truncate_dim=12 vectors with that prompt, cut then L2-normalised (unit length)
    reference = SentenceTransformer(str(st_folder), device="cpu", truncate_dim=12).encode(
        TEXTS, prompt_name="doc", normalize_embeddings=True
    )
    assert vectors.shape == (len(TEXTS), 12)
    assert cosines(vectors, reference).min() >= MIN_COS
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # and what the model cannot do is one clear 400
    with pytest.raises(openai.BadRequestError, match="declares these prompts: doc, document, query") as unknown:
        api(fleet).embeddings.create(input="x", model=model, extra_body={"prompt_name": "passage"})
    assert unknown.value.body["param"] == "prompt_name"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="ask for 1 to 32") as too_wide:
        api(fleet).embeddings.create(input="x", model=model, dimensions=64)
    assert too_wide.value.body["code"] == "dimensions_unsupported"  # type: ignore[index]


def test_the_gateway_takes_a_prompt_text_and_windows_once_the_default_prompt_is_cleared(
    fleet: Fleet, st_folder: Path, st: SentenceTransformer
) -> None:
    model = resolve_model(str(st_folder)).name

    def gateway(**extra: object) -> np.ndarray:
        response = api(fleet).embeddings.create(input=TEXTS, model=model, encoding_format="float", extra_body=extra)
        return np.array([row.embedding for row in response.data], dtype=np.float32)

    # when the openai package sends a prompt text of its own, as sentence-transformers' prompt=
    # then the vectors are ST's with that prompt
    assert cosines(gateway(prompt="passage: "), st.encode(TEXTS, prompt="passage: ")).min() >= MIN_COS
    # and long documents in windows are refused while the folder's default prompt applies, naming the way out
    with pytest.raises(openai.BadRequestError, match="windows take no prompt yet") as refused:
        gateway(long="chunk-mean")
    assert refused.value.body["param"] == "long"  # type: ignore[index]
    # and served with the prompt cleared: these texts fit the model, so each is its one window, ST's bare row
    assert cosines(gateway(long="chunk-mean", prompt=""), st.encode(TEXTS, prompt="")).min() >= MIN_COS
    # and a prompt with a prompt name, or a prompt that is not text, is one 400 naming the field
    with pytest.raises(openai.BadRequestError, match="'prompt_name' or 'prompt', not both") as both:
        gateway(prompt="x", prompt_name="doc")
    assert both.value.body["param"] == "prompt"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="'prompt' must be a string"):
        gateway(prompt=["x"])


def test_embed_cuts_and_prompts_a_corpus_and_records_both(fleet: Fleet, st_folder: Path, tmp_path: Path) -> None:
    corpus = write_texts_jsonl(tmp_path / "corpus.jsonl", TEXTS)
    env = fleet.env()
    # when a corpus is embedded with a prompt name and fewer dimensions on the running fleet
    out = tmp_path / "out.npy"
    flags = ("--broker", fleet.broker_url, "--prompt-name", "doc", "--dimensions", "16", "--no-progress")
    commands = [
        (str(corpus), "-o", str(out), *flags),
        # and a prompt name or width the model does not have, at the same time
        (str(corpus), "-o", str(tmp_path / "x.npy"), "--prompt-name", "passage"),
        (str(corpus), "-o", str(tmp_path / "y.npy"), "--dimensions", "33"),
    ]
    with ThreadPoolExecutor(len(commands)) as pool:
        done, unknown, wide = pool.map(lambda args: run_embedq("embed", *args, env=env), commands)
    assert done.returncode == 0, done.stderr + fleet.output()
    # then the rows are ST's, 16 wide, and the manifest says so
    reference = SentenceTransformer(str(st_folder), device="cpu", truncate_dim=16).encode(
        TEXTS, prompt_name="doc", normalize_embeddings=True
    )
    assert cosines(np.load(out), reference).min() >= MIN_COS
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert (manifest["dim"], manifest["dimensions"]) == (16, 16)
    assert (manifest["prompt_name"], manifest["prompt"]) == ("doc", PROMPTS["doc"])
    # and a prompt name or width the model does not have is exit 2, naming the flag, before anything is sent
    assert unknown.returncode == 2, unknown.stderr
    assert "--prompt-name passage: model tiny-st-prompts declares these prompts: doc, document, query" in unknown.stderr
    assert wide.returncode == 2 and "--dimensions 33: model tiny-st-prompts makes 32-dimensional" in wide.stderr


def test_a_request_whose_deadline_passed_in_the_queue_is_dropped_unrun_and_counted(
    fleet: Fleet, st_folder: Path
) -> None:
    model = resolve_model(str(st_folder)).name
    expired = f'embedq_chunks_expired_total{{lane="interactive",model="{model}"}}'
    docs_before, expired_before = metric(fleet, "embedq_docs_total"), metric(fleet, expired)
    worker = fleet.processes[0]
    paused = [worker.pid, *children_of(worker.pid)]
    # given a worker paused (SIGSTOP) while two requests wait for it: the client's (timeout=0.5) and the
    # gateway's (--timeout GATEWAY_TIMEOUT_S, a 504)
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            body = {"input": "another text nobody waits for"}
            via_gateway = pool.submit(http, "POST", f"{fleet.base}/v1/embeddings", body)  # type: ignore[attr-defined]
            with EmbedClient(settings=fleet.settings) as client, pytest.raises(RequestTimeout):
                client.embed(["a text nobody waits for any more"], timeout=0.5)
            assert via_gateway.result()[0] == 504
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
    # when the worker resumes and picks their chunks up, their deadlines have passed
    assert wait_until(lambda: metric(fleet, expired) == expired_before + 2, 30), fleet.output()
    # then it was dropped without running the model, and the worker still serves the next request
    assert metric(fleet, "embedq_docs_total") == docs_before
    with EmbedClient(settings=fleet.settings) as client:
        assert client.embed(["still served"], timeout=60).shape == (1, 32)
    assert metric(fleet, "embedq_docs_total") == docs_before + 1


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(child) for child in out.stdout.split()]
