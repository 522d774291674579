"""Poison inputs: a batch of every kind of bad record, a task whose texts are not strings, a pickled message.

One real worker serves the whole module (starting one per test would not fit the time budget); each
test uses its own job ids, so they do not see each other's work.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from producer.job.broker import sender_app
from producer.local.embedded_redis import EmbeddedRedis
from tests.conftest import Broker, WorkerFactory, WorkerProcess, run_embedq, wait_until
from tests.faults.conftest import succeeded, wait_ready, worker_env
from workers.protocol import events
from workers.protocol.config import TASK_EMBED_CHUNK
from workers.protocol.keys import Keys
from workers.protocol.model_info import model_identity
from workers.protocol.queues import BULK
from workers.protocol.routing import queue_name

pytestmark = pytest.mark.slow

LONG = "word " * 40_000  # 200,000 characters


@pytest.fixture(scope="module")
def module_broker(valkey: EmbeddedRedis) -> Iterator[Broker]:
    broker = Broker(valkey.url, f"b{uuid.uuid4().hex[:10]}", "valkey")
    yield broker
    broker.cleanup()


@pytest.fixture(scope="module")
def module_worker(
    module_broker: Broker, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    factory = WorkerFactory(tmp_path_factory.mktemp("bad-input-worker"))
    try:
        worker = factory.start(worker_env(module_broker, tiny_bert), concurrency=1)
        wait_ready(worker)
        yield worker
    finally:
        factory.stop_all()


def _mixed_jsonl(path: Path) -> Path:
    lines = [
        json.dumps({"id": "empty", "text": ""}).encode(),  # line 1: valid (an empty text is a text)
        json.dumps({"id": "blank", "text": "   \t "}).encode(),  # 2: valid
        json.dumps({"id": "null", "text": None}).encode(),  # 3: rejected
        json.dumps({"id": "number", "text": 42}).encode(),  # 4: rejected
        json.dumps({"id": "dict", "text": {"a": 1}}).encode(),  # 5: rejected
        b'{"id": "bytes", "text": "caf\xe9 \xff"}',  # 6: rejected, not UTF-8
        b'{"id": "surrogate", "text": "bad \\ud800 half"}',  # 7: rejected, lone surrogate
        json.dumps({"id": "long", "text": LONG}).encode(),  # 8: valid, truncated
        json.dumps({"id": "normal", "text": "a perfectly normal sentence"}).encode(),  # 9: valid
        b"[1, 2, 3]",  # 10: rejected, not an object
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_batch_of_every_kind_of_bad_record_through_the_cli(
    module_broker: Broker, module_worker: WorkerProcess, tiny_bert: Path, tmp_path: Path
) -> None:
    # given a JSONL file mixing empty, blank, null, number, dict, invalid UTF-8, lone surrogate, 200k chars
    corpus = _mixed_jsonl(tmp_path / "mixed.jsonl")
    out = tmp_path / "out.npy"
    env = {"EMBEDQ_KEY_PREFIX": module_broker.prefix}
    before = sum(succeeded(module_worker.log()).values())

    # when it is embedded, setting bad records aside
    result = run_embedq(
        "embed", str(corpus), "-o", str(out), "--broker", module_broker.url, "--model", str(tiny_bert),
        "--chunk-size", "2", "--on-invalid", "skip", env=env, timeout=60,
    )  # fmt: skip

    # then the valid records are embedded, in order, and each bad one is named with its line and reason
    assert result.returncode == 0, result.stderr + module_worker.log()[-2000:]
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["ids"] == ["empty", "blank", "long", "normal"]
    assert manifest["rejected"] == 6 and manifest["truncated"] == 1
    matrix = np.load(out)
    assert matrix.shape[0] == 4 and np.isfinite(matrix).all()
    rejects = {r["line"]: r["reason"] for r in map(json.loads, Path(f"{out}.rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == {3, 4, 5, 6, 7, 10}
    assert "missing or null" in rejects[3] and "got int" in rejects[4] and "got dict" in rejects[5]
    assert "not valid UTF-8" in rejects[6] and "lone surrogate" in rejects[7] and "JSON object" in rejects[10]
    # and the worker neither crashed nor looped: two chunks, each run once
    assert sum(succeeded(module_worker.log()).values()) - before == 2
    assert module_worker.process.poll() is None

    # when the same file is embedded with the default --on-invalid fail
    failed = run_embedq(
        "embed", str(corpus), "-o", str(tmp_path / "strict.npy"), "--broker", module_broker.url,
        "--model", str(tiny_bert), env=env, timeout=60,
    )  # fmt: skip
    # then it stops with exit code 3 at the first bad record, naming the file, line and reason
    assert failed.returncode == 3, failed.stderr
    assert f"{corpus}:3: field 'text' is missing or null" in failed.stderr
    assert not (tmp_path / "strict.npy").exists()


def test_the_python_client_names_each_bad_record_and_embeds_valid_ones(
    module_broker: Broker, module_worker: WorkerProcess, tiny_bert: Path
) -> None:
    from producer.serve.client import EmbedClient
    from workers.protocol.errors import InvalidRecords

    with EmbedClient(module_broker.url, key_prefix=module_broker.prefix, model=str(tiny_bert)) as client:
        # when a batch mixes bad values with good ones
        mixed: list[object] = ["", "  ", None, 7, {"a": 1}, b"caf\xe9", "bad \ud800 half", LONG, "normal text"]
        with pytest.raises(InvalidRecords) as refused:
            client.embed(mixed, timeout=30)  # type: ignore[arg-type]
        # then the error names every bad record by index and reason, and nothing was sent
        message = str(refused.value)
        for index in (2, 3, 4, 5, 6):
            assert f"input[{index}]" in message, message
        assert "input[0]" not in message and "input[7]" not in message
        # and the valid ones embed fine, the 200,000-character text included
        vectors = client.embed(["", "  ", LONG, "normal text"], timeout=60)
        assert vectors.shape == (4, 32) and np.isfinite(vectors).all()


def test_a_task_whose_texts_are_not_strings_fails_once_naming_the_record(
    module_broker: Broker, module_worker: WorkerProcess, tiny_bert: Path
) -> None:
    # given a task sent by some other program, bypassing the producer's validation
    app = sender_app(module_broker.settings())
    job = f"foreign{uuid.uuid4().hex[:8]}"
    bulk = queue_name(BULK, model_identity(str(tiny_bert)))  # the tiny model's own queue (workers/protocol/routing.py)
    app.send_task(TASK_EMBED_CHUNK, args=[job, 0, ["fine", None, 3], {"results": "redis"}], queue=bulk)

    # then the worker reports the chunk failed, naming the record, and does not run it again
    client = module_broker.client()
    event = events.pop(client, Keys(module_broker.prefix), job, timeout_s=30)
    assert event is not None and event["type"] == "failed", event
    assert "record 1: text must be a string, got NoneType" in event["reason"]
    assert sum(n for task, n in succeeded(module_worker.log()).items() if task.startswith(job)) == 0
    assert client.hvals(Keys(module_broker.prefix).deliveries(job)) == [b"1"]
    assert module_worker.process.poll() is None


def test_a_pickled_task_message_is_refused_and_never_executed(
    module_broker: Broker, module_worker: WorkerProcess, tiny_bert: Path
) -> None:
    # given a task message serialised with pickle (which would run code on load), sent straight to the queue
    app = sender_app(module_broker.settings())
    job = f"pickle{uuid.uuid4().hex[:8]}"
    task_id = f"{job}-0-0"
    bulk = queue_name(BULK, model_identity(str(tiny_bert)))
    app.send_task(TASK_EMBED_CHUNK, args=[job, 0, ["x"], {}], task_id=task_id, queue=bulk, serializer="pickle")

    # then the worker refuses to deserialise it, drops it (no redelivery loop), and never runs the task
    assert wait_until(lambda: "Refusing to deserialize untrusted content of type pickle" in module_worker.log(), 30)
    client = module_broker.client()
    assert wait_until(lambda: client.llen(f"{module_broker.prefix}:{bulk}") == 0, 10)
    assert not client.exists(Keys(module_broker.prefix).deliveries(job))
    assert task_id not in module_worker.log().split("Refusing")[0]
    assert succeeded(module_worker.log())[task_id] == 0
    assert module_worker.process.poll() is None
