"""Several models on one fleet: each chunk reaches only the workers of its own model.

One module-scoped fleet on the embedded Valkey: two real workers, one serving a 32-wide tiny BERT
(`mini-32`, also the gateway's default), one serving a 48-wide one (`mini-48`), so any mix-up shows in
the vectors' width; one real gateway. Every path that picks a model is driven against it: the `openai`
package (`/v1/models`, a 404, embeddings of each model), the CLI (exit 2 naming the served models, a
corpus job by a served name), the Python clients, and `/metrics`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from producer.local.cluster import worker_command
from producer.local.processes import start_process
from producer.serve.async_client import AsyncEmbedClient
from producer.serve.client import EmbedClient
from tests.conftest import Broker, run_embedq, wait_until, write_texts_jsonl
from tests.serving import Fleet, http
from workers.encoder import Encoder
from workers.protocol.errors import ModelNotServed
from workers.protocol.keys import Keys
from workers.protocol.liveness import live_workers
from workers.protocol.model_info import DEFAULT_MODEL_NAME, default_model_path, resolve_model
from workers.protocol.routing import queue_name, split_queue, worker_queues
from workers.protocol.served import served_models

pytestmark = pytest.mark.slow

TEXTS = ["The cat sat on the mat.", "Two models, one fleet", "", "naïve café ünïcode ✓", "a longer sentence " * 8]
WIDTHS = {"mini-32": 32, "mini-48": 48}


def _tiny_bert(folder: Path, width: int, seed: int) -> Path:
    """A 2-layer BERT `width` wide with the MiniLM tokenizer and random weights (fixed seed)."""
    import torch
    from transformers import BertConfig, BertModel

    folder.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_path() / name, folder / name)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model name (its folder's name, as the fleet knows it) -> folder."""
    root = tmp_path_factory.mktemp("models")
    return {name: _tiny_bert(root / name, width, seed) for seed, (name, width) in enumerate(WIDTHS.items())}


@pytest.fixture(scope="module")
def fleet(valkey: object, models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One worker per model and a gateway whose own model is mini-32, all started at once."""
    serving = Fleet(valkey.url, models["mini-32"], tmp_path_factory.mktemp("models-fleet"))  # type: ignore[attr-defined]
    logs = []
    try:
        for name, folder in models.items():
            # No -Q: each worker consumes its own model's queues, as `embedq worker --model` does.
            command = worker_command(1, "solo", hostname=f"{name}-{uuid.uuid4().hex[:6]}@test", loglevel="INFO")
            log = serving.folder / f"worker-{name}.log"
            # torch (no OpenVINO conversion at start, as the in-process reference), one thread each: two share 2 cores.
            env = serving.env(EMBEDQ_MODEL=str(folder), EMBEDQ_RUNTIME="torch", EMBEDQ_TORCH_THREADS="1")
            serving.processes.append(start_process(command, env=env, log_path=log))
            serving.logs.append(log)
            logs.append(log)
        serving.main = serving.start_gateway()  # type: ignore[attr-defined]
        ready = lambda: all("ready:" in log.read_text(errors="replace") for log in logs)  # noqa: E731
        assert wait_until(ready, 120), serving.output()
        keys = Keys(serving.prefix)
        client = Broker(serving.broker_url, serving.prefix, "valkey").client()
        both = lambda: set(served_models(live_workers(client, keys))) == set(WIDTHS)  # noqa: E731
        assert wait_until(both, 30), serving.output()
        client.close()
        yield serving
    finally:
        serving.stop()
        Broker(valkey.url, serving.prefix, "valkey").cleanup()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def reference(models: dict[str, Path]) -> dict[str, np.ndarray]:
    """Each model run in process on TEXTS: what the fleet must return for it."""
    return {
        name: Encoder.load(resolve_model(str(folder)), "cpu").encode(TEXTS).embeddings
        for name, folder in models.items()
    }


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, f"{got.shape} != {want.shape}: the chunk went to the other model's worker"
    assert _cosines(got, want).min() >= 0.99999


def test_queue_names_keep_the_default_plain_and_name_every_other_model() -> None:
    assert worker_queues("") == ["interactive", "bulk"]  # README's `-Q interactive,bulk` stays true
    assert queue_name("bulk", DEFAULT_MODEL_NAME) == "bulk"
    assert queue_name("interactive", "BAAI/bge-small-en-v1.5") == "interactive.BAAI/bge-small-en-v1.5"
    assert split_queue("bulk.BAAI/bge-small-en-v1.5") == ("bulk", "BAAI/bge-small-en-v1.5")
    assert split_queue("interactive") == ("interactive", DEFAULT_MODEL_NAME)
    # a worker narrowed to one lane serves its model on that lane only
    record = {"hostname": "w@h", "model": "m", "queues": ["interactive.m"]}
    assert served_models([record], "interactive") == {"m": ["w@h"]} and served_models([record], "bulk") == {}


def test_each_worker_announces_its_model_and_consumes_only_its_queues(fleet: Fleet) -> None:
    client = Broker(fleet.broker_url, fleet.prefix, "valkey").client()
    records = {r["model"]: r for r in live_workers(client, Keys(fleet.prefix))}
    client.close()
    assert sorted(records["mini-48"]["queues"]) == ["bulk.mini-48", "interactive.mini-48"]
    assert sorted(records["mini-32"]["queues"]) == ["bulk.mini-32", "interactive.mini-32"]


def test_the_openai_package_lists_both_models_gets_each_and_a_404_for_another(
    fleet: Fleet, reference: dict[str, np.ndarray]
) -> None:
    api = openai.OpenAI(base_url=f"{fleet.main}/v1", api_key="unused", max_retries=0)  # type: ignore[attr-defined]
    assert sorted(model.id for model in api.models.list()) == sorted(WIDTHS)
    for name in WIDTHS:
        response = api.embeddings.create(input=TEXTS, model=name)
        assert response.model == name
        _assert_same(np.array([item.embedding for item in response.data], dtype=np.float32), reference[name])
    with pytest.raises(openai.NotFoundError) as missing:
        api.embeddings.create(input=TEXTS, model="mini-64")
    error = missing.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found" and error["param"] == "model"
    assert "'mini-64'" in error["message"] and "mini-32, mini-48" in error["message"]


def test_metrics_count_work_and_queues_by_model(fleet: Fleet) -> None:
    api = openai.OpenAI(base_url=f"{fleet.main}/v1", api_key="unused", max_retries=0)  # type: ignore[attr-defined]
    api.embeddings.create(input=["counted for mini-48"], model="mini-48")
    status, text = http("GET", f"{fleet.main}/metrics")  # type: ignore[attr-defined]
    assert status == 200
    for name in WIDTHS:
        assert f'embedq_queue_depth{{lane="bulk",model="{name}"}} 0.0' in text
        assert f'embedq_queue_depth{{lane="interactive",model="{name}"}} 0.0' in text
    assert 'embedq_model_docs_total{model="mini-48"}' in text
    assert 'embedq_model_requests_total{model="mini-48"}' in text
    assert 'embedq_model_chunks_done_total{model="mini-48"}' in text


def test_the_python_clients_pick_the_model_and_refuse_one_nobody_serves(
    fleet: Fleet, reference: dict[str, np.ndarray]
) -> None:
    for name in WIDTHS:
        with EmbedClient(settings=fleet.settings, model=name) as client:
            assert client.model.name == name and client.dim == WIDTHS[name]  # described as its workers announced it
            _assert_same(client.embed(TEXTS, timeout=60), reference[name])

    async def both_async() -> None:
        client = AsyncEmbedClient(settings=fleet.settings, model="mini-48")
        try:
            _assert_same(await client.embed(TEXTS, timeout=60), reference["mini-48"])
            nobody = AsyncEmbedClient(settings=fleet.settings, model="mini-64")
            with pytest.raises(ModelNotServed):
                await nobody.embed(TEXTS, timeout=600)
            await nobody.aclose()
        finally:
            await client.aclose()

    asyncio.run(both_async())
    # refused at once (never queued to wait for its 600 s timeout), naming what is served
    with EmbedClient(settings=fleet.settings, model="mini-64") as nobody, pytest.raises(ModelNotServed) as refused:
        nobody.embed(TEXTS, timeout=600)
    assert refused.value.served == sorted(WIDTHS) and nobody.queue_depth() == 0


def test_the_cli_names_the_served_models_and_embeds_a_corpus_by_a_served_name(
    fleet: Fleet, reference: dict[str, np.ndarray], tmp_path: Path
) -> None:
    corpus = write_texts_jsonl(tmp_path / "corpus.jsonl", TEXTS)
    env = {"EMBEDQ_KEY_PREFIX": fleet.prefix, "HF_HUB_OFFLINE": "1"}
    common = ("embed", str(corpus), "--broker", fleet.broker_url, "--chunk-size", "2", "--no-progress")
    # a model no live worker serves: exit 2 in one line, naming the served ones, before anything is sent
    refused = run_embedq(
        *common, "-o", str(tmp_path / "no.npy"), "--model", "mini-64", "--wait-for-workers", "0", env=env
    )
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "'mini-64'" in lines[0] and "served: mini-32, mini-48" in lines[0], refused.stderr
    # a corpus job by the name the fleet serves (no folder here): every chunk goes to mini-48's queue only
    out = tmp_path / "out.npy"
    done = run_embedq(*common, "-o", str(out), "--model", "mini-48", env=env)
    assert done.returncode == 0, done.stderr
    _assert_same(np.load(out), reference["mini-48"])
    assert json.loads(Path(f"{out}.manifest.json").read_text())["model"] == "mini-48"


def test_the_cli_worker_flag_maps_lanes_to_its_models_queues(models: dict[str, Path]) -> None:
    # `embedq worker --model M --queues interactive` only prints and execs celery: check what it would run
    from producer.cli.main import build_parser, worker_argv
    from workers.protocol.config import Settings

    args = build_parser().parse_args(["worker", "--model", str(models["mini-48"]), "--queues", "interactive"])
    command, _, line = worker_argv(args, Settings(model=str(models["mini-48"])))
    assert command[command.index("-Q") + 1] == "interactive.mini-48" and "queues interactive.mini-48" in line
    # and its default node name names the model, so two models' workers can share a host without -n
    assert command[command.index("-n") + 1] == "embedq-mini-48@%h"
    default_args = build_parser().parse_args(["worker"])
    default_command, _, _ = worker_argv(default_args, Settings())
    assert default_command[default_command.index("-n") + 1] == "embedq@%h"


def test_a_gateway_client_built_while_its_workers_load_learns_the_model_once_announced(broker: Broker) -> None:
    from producer.serve.model_clients import ModelClients
    from workers.protocol import model_registry
    from workers.protocol.config import Settings
    from workers.protocol.keys import connect
    from workers.protocol.liveness import WorkerBeacon
    from workers.protocol.model_info import ModelInfo

    # given a live worker of model "late" whose child has not loaded (and so not announced) the model yet
    settings = Settings.from_env({}).replace(broker_url=broker.url, key_prefix=broker.prefix)
    keys = Keys(broker.prefix)
    redis_client = connect(broker.url)
    info = {"queues": [queue_name("interactive", "late"), queue_name("bulk", "late")], "model": "late"}
    beacon = WorkerBeacon(redis_client, keys, "late-worker@test", info, 30.0).start()

    def make(model: str | None = None) -> AsyncEmbedClient:
        return AsyncEmbedClient(settings=settings.replace(model=model) if model else settings)

    async def scenario() -> None:
        clients = ModelClients(make(), make)
        try:
            # when the gateway builds its client for "late" now, it knows only the name
            entry = await clients.pick("late")
            assert entry.client.model.pooling == "" and entry.client.dim == 0
            # and then the child announces the model, with a prompt
            late = ModelInfo("late", "/elsewhere/late", True, "mean", 48, 32, {"query": "query: "}, "query", True)
            with redis_client.pipeline() as pipe:
                model_registry.announce(pipe, keys, late)
                pipe.execute()
            # then the next request's options are checked against what was announced
            again = await clients.pick("late")
            assert again.client.check_options(prompt_name="query")["prompt"] == "query: "
            assert again.client.model.pooling == "mean" and again.client.dim == 32
        finally:
            await clients.aclose()

    try:
        asyncio.run(scenario())
    finally:
        beacon.stop()
        redis_client.close()
