"""The HTTP gateway (`embedq serve`), driven by the official `openai` package against real processes.

One real worker (tiny BERT) and two real gateway processes serve the whole module: `main` (API key,
small limits) in front of the worker, and `idle` on a key prefix no worker consumes (504, 429, 503).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from tests.conftest import Broker
from tests.serving import Fleet, http
from workers.encoder import Encoder
from workers.protocol.model_info import resolve_model

API_KEY = "test-key-123"
TEXTS = ["The cat sat on the mat.", "Embeddings for web apps", "", "naïve café ünïcode ✓"]


@pytest.fixture(scope="module")
def fleet(valkey: object, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    serving = Fleet(valkey.url, tiny_bert, tmp_path_factory.mktemp("gateway"))  # type: ignore[attr-defined]
    key_file = serving.folder / "api-key"
    key_file.write_text(API_KEY + "\n")
    try:
        serving.start_worker()
        serving.main = serving.start_gateway(
            "--api-key-file",
            str(key_file),
            "--max-inputs",
            "8",  # type: ignore[attr-defined]
            "--max-body-mb",
            "0.01",
        )
        serving.idle = serving.start_gateway(
            "--max-queue",
            "2",
            "--timeout",
            "1",  # type: ignore[attr-defined]
            prefix=serving.prefix + "idle",
        )
        yield serving
    finally:
        serving.stop()
        Broker(valkey.url, serving.prefix, "valkey").cleanup()  # type: ignore[attr-defined]
        Broker(valkey.url, serving.prefix + "idle", "valkey").cleanup()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def reference(tiny_bert: Path) -> np.ndarray:
    return Encoder.load(resolve_model(str(tiny_bert)), "cpu").encode(TEXTS).embeddings


def client(base: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def model_id(fleet: Fleet) -> str:
    return resolve_model(str(fleet.model)).name


def metric(base: str, name: str) -> float:
    status, text = http("GET", f"{base}/metrics")
    assert status == 200
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_the_openai_package_gets_the_reference_vectors_as_float_and_base64(fleet: Fleet, reference: np.ndarray) -> None:
    # given the official openai client pointed at the gateway
    api = client(fleet.main)  # type: ignore[attr-defined]
    # when it asks for embeddings in both encodings (base64 is the package's own default)
    as_float = api.embeddings.create(input=TEXTS, model=model_id(fleet), encoding_format="float")
    as_base64 = api.embeddings.create(input=TEXTS, model=model_id(fleet))
    # then both carry the in-process reference rows, in input order, with usage counted
    for response in (as_float, as_base64):
        assert [item.index for item in response.data] == list(range(len(TEXTS)))
        np.testing.assert_allclose(np.array([item.embedding for item in response.data]), reference, atol=1e-5)
        assert response.model == model_id(fleet)
    assert as_float.usage.prompt_tokens > len(TEXTS)


def test_a_single_string_is_one_embedding(fleet: Fleet, reference: np.ndarray) -> None:
    response = client(fleet.main).embeddings.create(input=TEXTS[0], model=model_id(fleet))  # type: ignore[attr-defined]
    assert len(response.data) == 1
    np.testing.assert_allclose(response.data[0].embedding, reference[0], atol=1e-5)


def test_requests_the_model_cannot_serve_are_refused_clearly(fleet: Fleet) -> None:
    api = client(fleet.main)  # type: ignore[attr-defined]
    dim = resolve_model(str(fleet.model)).dim
    # more dimensions than the model makes (fewer are cut: tests/test_prompts_dimensions.py)
    with pytest.raises(openai.BadRequestError, match=f"makes {dim}-dimensional vectors; ask for 1 to {dim}") as refused:
        api.embeddings.create(input="x", model=model_id(fleet), dimensions=dim + 1)
    assert refused.value.body["code"] == "dimensions_unsupported"  # type: ignore[index]
    assert len(api.embeddings.create(input="x", model=model_id(fleet), dimensions=dim).data[0].embedding) == dim
    # token arrays (what LangChain's OpenAIEmbeddings sends by default): the message names its setting
    with pytest.raises(openai.BadRequestError, match="token ids.*check_embedding_ctx_length=False"):
        api.embeddings.create(input=[[101, 2023, 102]], model=model_id(fleet))
    # an invalid record, named by its index
    with pytest.raises(openai.BadRequestError, match=r"input\[1\]: must be a string, got int"):
        api.embeddings.create(input=["fine", 7, "fine"], model=model_id(fleet))  # type: ignore[list-item]
    # another model
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        api.embeddings.create(input="x", model="text-embedding-3-small")


def test_langchain_openai_embeddings_get_the_reference_vectors(fleet: Fleet, reference: np.ndarray) -> None:
    from langchain_openai import OpenAIEmbeddings

    # given LangChain's OpenAI embeddings pointed at the gateway, sending text as the 400 message advises
    embeddings = OpenAIEmbeddings(
        model=model_id(fleet),
        base_url=f"{fleet.main}/v1",  # type: ignore[attr-defined]
        api_key=API_KEY,  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    # when it embeds documents and a query
    documents = embeddings.embed_documents(TEXTS)
    query = embeddings.embed_query(TEXTS[0])
    # then they are the in-process reference rows
    np.testing.assert_allclose(np.array(documents), reference, atol=1e-5)
    np.testing.assert_allclose(query, reference[0], atol=1e-5)


def test_a_wrong_or_missing_api_key_is_401(fleet: Fleet) -> None:
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client(fleet.main, key="wrong").embeddings.create(input="x", model=model_id(fleet))  # type: ignore[attr-defined]
    status, body = http("POST", f"{fleet.main}/v1/embeddings", {"input": "x"})  # type: ignore[attr-defined]
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_docs_and_the_openapi_schema_need_the_key_too(fleet: Fleet) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for path in ("/docs", "/openapi.json", "/redoc", "/v1/nowhere"):
        status, body = http("GET", f"{fleet.main}{path}")  # type: ignore[attr-defined]
        assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, body)
    assert http("GET", f"{fleet.main}/openapi.json", headers=auth)[0] == 200  # type: ignore[attr-defined]
    # a key that is not even ASCII is just a wrong key, compared without error
    status, body = http("GET", f"{fleet.main}/v1/models", headers={"Authorization": "Bearer \u00ff\u00e9"})  # type: ignore[attr-defined]
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_oversized_requests_get_413(fleet: Fleet) -> None:
    # given limits of 8 inputs and 0.01 MiB per request
    with pytest.raises(openai.APIStatusError, match="at most 8 per request") as too_many:
        client(fleet.main).embeddings.create(input=["x"] * 9, model=model_id(fleet))  # type: ignore[attr-defined]
    assert too_many.value.status_code == 413
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, body = http("POST", f"{fleet.main}/v1/embeddings", {"input": "y" * 20000}, auth)  # type: ignore[attr-defined]
    assert status == 413 and "over the limit" in body["error"]["message"]


def test_models_and_health_describe_the_fleet(fleet: Fleet) -> None:
    models = client(fleet.main).models.list()  # type: ignore[attr-defined]
    assert [m.id for m in models.data] == [model_id(fleet)]
    status, health = http("GET", f"{fleet.main}/health")  # type: ignore[attr-defined]
    assert status == 200 and health["status"] == "ok" and health["worker"].startswith("serve-")


def test_without_workers_health_is_503_requests_time_out_and_a_full_queue_is_429(fleet: Fleet) -> None:
    # given a gateway whose key prefix no worker consumes, a 1 s timeout and room for 2 queued requests
    idle = client(fleet.idle)  # type: ignore[attr-defined]
    status, health = http("GET", f"{fleet.idle}/health")  # type: ignore[attr-defined]
    assert status == 503 and "no worker answered" in health["reason"]
    # when requests pile up, then each times out (504), and once the queue holds 2 the next is refused (429)
    for _ in range(2):
        with pytest.raises(openai.APIStatusError, match="are workers running") as timed_out:
            idle.embeddings.create(input="nobody is listening", model=model_id(fleet))
        assert timed_out.value.status_code == 504
    with pytest.raises(openai.RateLimitError, match="interactive queue holds 2"):
        idle.embeddings.create(input="one too many", model=model_id(fleet))


def test_a_repeated_sentence_costs_nothing_and_metrics_show_the_hit(fleet: Fleet) -> None:
    base = fleet.main  # type: ignore[attr-defined]
    api = client(base)
    sentence = "a sentence a web app asks for twice"
    api.embeddings.create(input=sentence, model=model_id(fleet))
    docs, hits = metric(base, "embedq_docs_total"), metric(base, "embedq_cache_hits_total")
    # when the same sentence comes again
    again = api.embeddings.create(input=sentence, model=model_id(fleet))
    # then no worker embedded anything, the cache answered, and the hit is reported
    assert len(again.data) == 1 and again.usage.prompt_tokens == 0
    assert metric(base, "embedq_docs_total") == docs
    assert metric(base, "embedq_cache_hits_total") == hits + 1
    assert 0 < metric(base, "embedq_cache_hit_ratio") <= 1
    assert metric(base, "embedq_model_loads_total") >= 1
    assert metric(base, f'embedq_queue_depth{{lane="bulk",model="{model_id(fleet)}"}}') == 0
    assert metric(base, f'embedq_model_docs_total{{model="{model_id(fleet)}"}}') >= docs
    assert "embedq_gateway_request_seconds_bucket" in http("GET", f"{base}/metrics")[1]
