"""The Python client (sync and asyncio), the interactive lane, the cache and `embedq status`.

One real worker (tiny BERT, one pool child) on the embedded Valkey serves the whole module.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from producer.job.broker import send_chunk, sender_app
from producer.job.record import JobRecord
from producer.job.status import job_status
from producer.serve.async_client import AsyncEmbedClient
from producer.serve.client import EmbedClient
from tests.conftest import Broker, run_embedq, wait_until
from tests.serving import Fleet
from workers.encoder import Encoder
from workers.protocol.errors import InvalidRecords, RequestTimeout
from workers.protocol.keys import Keys
from workers.protocol.model_info import model_identity, resolve_model
from workers.protocol.queues import BULK
from workers.protocol.routing import queue_name

TEXTS = [f"sentence {i} about {'lanes ' * (i % 5)}and queues" for i in range(70)]


@pytest.fixture(scope="module")
def fleet(valkey: object, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    serving = Fleet(valkey.url, tiny_bert, tmp_path_factory.mktemp("client"))  # type: ignore[attr-defined]
    try:
        serving.start_worker(concurrency=1)
        yield serving
    finally:
        serving.stop()
        Broker(valkey.url, serving.prefix, "valkey").cleanup()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def reference(tiny_bert: Path) -> np.ndarray:
    return Encoder.load(resolve_model(str(tiny_bert)), "cpu").encode(TEXTS).embeddings


def leftover_request_keys(fleet: Fleet) -> list[bytes]:
    client = Broker(fleet.broker_url, fleet.prefix, "valkey").client()
    return [k for k in client.scan_iter(match=f"{fleet.prefix}:*req-*", count=1000)]


def test_embed_returns_the_reference_rows_in_order_and_leaves_no_keys(fleet: Fleet, reference: np.ndarray) -> None:
    # given a client that splits requests into chunks of 32 texts
    client = EmbedClient(settings=fleet.settings)
    # when it embeds 70 texts plus a duplicate of the first
    matrix = client.embed([*TEXTS, TEXTS[0]], timeout=60)
    # then rows match the in-process reference in input order, and the request's keys are gone
    assert matrix.dtype == np.float32 and matrix.shape == (71, reference.shape[1])
    np.testing.assert_allclose(matrix[:70], reference, atol=1e-5)
    np.testing.assert_allclose(matrix[70], reference[0], atol=1e-6)
    assert leftover_request_keys(fleet) == []


def test_submit_returns_at_once_and_ready_turns_true(fleet: Fleet, reference: np.ndarray) -> None:
    client = EmbedClient(settings=fleet.settings)
    handle = client.submit(TEXTS[:3])
    assert wait_until(handle.ready, timeout_s=60)
    np.testing.assert_allclose(handle.result(timeout=1), reference[:3], atol=1e-5)


def test_invalid_records_are_named_by_index_and_nothing_is_sent(fleet: Fleet) -> None:
    client = EmbedClient(settings=fleet.settings)
    with pytest.raises(InvalidRecords) as refused:
        client.embed(["ok", None, "ok", 3.5, "bad \ud800 surrogate"])
    assert [index for index, _ in refused.value.problems] == [1, 3, 4]
    message = str(refused.value)
    assert "input[1]: is missing or null" in message and "input[3]: must be a string, got float" in message
    assert "lone surrogate" in message
    assert client.queue_depth() == 0


def test_a_request_nobody_serves_times_out_with_a_hint(fleet: Fleet) -> None:
    client = EmbedClient(settings=fleet.settings.replace(key_prefix=fleet.prefix + "nobody"))
    with pytest.raises(RequestTimeout, match="are workers running"):
        client.embed(["anyone there?"], timeout=0.5)
    Broker(fleet.broker_url, fleet.prefix + "nobody", "valkey").cleanup()


def test_an_abandoned_request_expires_unrun_and_leaves_nothing_behind(fleet: Fleet) -> None:
    # given a request whose caller gives up at once (it expires 1 ms after sending)
    client = EmbedClient(settings=fleet.settings)
    abandoned = client.submit(["nobody waits for this"], expires_s=0.001)
    # when the worker reaches it, after a request that is waited for
    client.embed(["somebody waits for this"], timeout=60)
    assert wait_until(lambda: client.queue_depth() == 0, timeout_s=30)
    assert client.embed(["and the worker is still serving"], timeout=60).shape[0] == 1
    # then the abandoned one was discarded unrun: no event, no stored array
    keys = Keys(fleet.prefix)
    assert client.redis.llen(keys.events(abandoned.job)) == 0
    assert not client.redis.exists(keys.result(abandoned.job, 0))


def test_the_async_client_does_not_block_the_event_loop(fleet: Fleet, reference: np.ndarray) -> None:
    async def scenario() -> tuple[list[np.ndarray], int]:
        client = AsyncEmbedClient(settings=fleet.settings)
        ticks = 0
        done = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        beat = asyncio.create_task(heartbeat())
        results = await asyncio.gather(*(client.embed(TEXTS[i : i + 5], timeout=60) for i in range(0, 25, 5)))
        done.set()
        await beat
        await client.aclose()
        return results, ticks

    # when five requests are awaited concurrently next to a heartbeat task
    results, ticks = asyncio.run(scenario())
    # then every request got its own rows, and the loop kept running meanwhile
    np.testing.assert_allclose(np.concatenate(results), reference[:25], atol=1e-5)
    assert ticks > 3


def test_a_repeated_text_is_served_from_the_cache(fleet: Fleet, reference: np.ndarray) -> None:
    client = EmbedClient(settings=fleet.settings, cache=True)
    stats_key = Keys(fleet.prefix).stats()
    redis_client = client.redis
    first = client.embed([TEXTS[5]])
    docs_before = int(redis_client.hget(stats_key, "docs") or 0)
    # when the same text is asked for again
    again = client.embed([TEXTS[5]])
    # then the worker embedded nothing, the vector is the same, and the client reports the hit
    assert int(redis_client.hget(stats_key, "docs") or 0) == docs_before
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(again[0], reference[5], atol=1e-5)
    assert client.stats["cache_hits"] == 1 and client.stats["cache_misses"] == 1
    assert client.stats["cache_hit_rate"] == 0.5


def test_interactive_requests_overtake_a_bulk_backlog(fleet: Fleet, tmp_path: Path) -> None:
    # given one pool child and a backlog of bulk chunks in front of it
    settings = fleet.settings
    long_texts = [("a long bulk document " * 25).strip()] * 120
    app = sender_app(settings)
    chunks = 4
    for chunk in range(chunks):
        bulk = queue_name(BULK, model_identity(str(fleet.model)))  # the served model's own bulk queue
        send_chunk(app, "bulk-backlog", chunk, long_texts, {"normalize": True}, queue=bulk)
    client = EmbedClient(settings=settings)
    events_key = Keys(fleet.prefix).events("bulk-backlog")
    # when an interactive request arrives after the whole backlog was queued
    client.embed(["an urgent sentence"], timeout=120)
    finished_bulk = client.redis.llen(events_key)
    # then it ran before the waiting bulk chunks: only the one already running (and maybe one more) finished first
    assert finished_bulk <= 2, f"{finished_bulk} of {chunks} bulk chunks ran before the interactive request"
    assert wait_until(lambda: client.redis.llen(events_key) == chunks, timeout_s=120)


def test_status_shows_a_finished_job(fleet: Fleet, tmp_path: Path) -> None:
    # given a corpus job embedded through the module's worker
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    env = {"EMBEDQ_KEY_PREFIX": fleet.prefix}
    embedded = run_embedq(
        "embed",
        str(corpus),
        "-o",
        str(tmp_path / "out.npy"),
        "--broker",
        fleet.broker_url,
        "--model",
        str(fleet.model),
        "--chunk-size",
        "16",
        env=env,
    )
    assert embedded.returncode == 0, embedded.stderr
    # when an operator asks for the status of jobs
    status = run_embedq("status", "--broker", fleet.broker_url, env=env)
    # then the job is listed as done with 5 of 5 chunks, all 70 docs, and no failures
    assert status.returncode == 0, status.stderr
    line = next(row for row in status.stdout.splitlines() if str(corpus) in row)
    assert "done" in line and " 5/5 " in line and " 70/70 " in line, status.stdout
    assert line.split()[6] == "0"
    job = line.split()[0]
    assert run_embedq("status", job, "--broker", fleet.broker_url, env=env).stdout.count(job) == 1
    # and an unknown job is one clear line with exit code 2
    missing = run_embedq("status", "no-such-job", "--broker", fleet.broker_url, env=env)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr


def test_status_of_a_running_job_estimates_rate_and_eta() -> None:
    fields = {
        "state": "running",
        "started": "1000",
        "total_hint": "1000",
        "chunk_rows": "100",
        "done_chunks": "3",
        "failed_chunks": "1",
        "input": "corpus.jsonl",
    }
    status = job_status("j1", JobRecord.from_hash(fields), now=1010.0)
    assert (status.done_chunks, status.total_chunks, status.docs_done, status.docs_total) == (3, 10, 300, 1000)
    assert status.docs_per_s == pytest.approx(30.0)
    assert status.eta_s == pytest.approx(700 / 30.0)
    assert status.failures == 1
