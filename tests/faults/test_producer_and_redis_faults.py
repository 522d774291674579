"""A SIGKILLed producer that is run again, and Redis killed and restarted with and without persistence.

Real valkey-server processes (killed with SIGKILL, restarted on the same port), real workers that
are never restarted by hand, the real CLI; the output must equal a clean run's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from producer.local.embedded_redis import EmbeddedRedis
from tests.conftest import Broker, WorkerFactory, run_embedq, wait_until
from tests.faults.conftest import (
    ProducerFactory,
    assert_same_output,
    chunk_of,
    deliveries,
    embed_args,
    succeeded,
    wait_ready,
    worker_env,
    write_corpus,
)

pytestmark = pytest.mark.slow


def _finished_chunks(out: Path) -> set[int]:
    """Chunks the producer has written and logged (what a rerun must reuse, never recompute)."""
    log = Path(f"{out}.partial.log")
    lines = log.read_text().splitlines()[1:] if log.exists() else []
    return {json.loads(line)["chunk"] for line in lines if line.endswith("}")}


#: Chunks of 8 that shrink at the tail (8, 6, 5, 4, 3, 2, 1, 1, 1, 1 for 32 texts): a rerun cuts the same ones.
SHRINKING = ("--chunk-size", "8", "--min-chunk-size", "1", "--tail-chunks", "4")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("plan", [(), SHRINKING], ids=["full-chunks", "shrinking-chunks"])
def test_a_sigkilled_producer_run_again_resumes_and_recomputes_no_finished_chunk(
    plan: tuple[str, ...],
    fault_broker: Broker,
    workers: WorkerFactory,
    producers: ProducerFactory,
    tiny_bert: Path,
    reference: np.ndarray,
    tmp_path: Path,
) -> None:
    # given a job half done
    worker = workers.start(worker_env(fault_broker, tiny_bert, delay_s=0.4), concurrency=1)
    # (ready first: a message held by a worker still loading its model for longer than the shortened
    # visibility timeout is delivered again, which would blur what this test counts)
    wait_ready(worker)
    corpus, out = write_corpus(tmp_path / "in.jsonl"), tmp_path / "out.npy"
    args = embed_args(corpus, out, fault_broker.url, tiny_bert, *plan)
    env = {"EMBEDQ_KEY_PREFIX": fault_broker.prefix}
    first = producers.start(*args, env=env)
    assert wait_until(lambda: len(_finished_chunks(out)) >= 3, 60), first.stderr() + worker.log()[-2000:]

    # when the producer is SIGKILLed, then the same command is run again
    first.process.kill()
    first.wait(10)
    finished = _finished_chunks(out)
    rerun = run_embedq(*args, env=env, timeout=80)

    # then it completes, saying how many chunks it reused ...
    assert rerun.returncode == 0, rerun.stderr + worker.log()[-3000:]
    reused = int(re.search(r"(\d+) chunks reused from an earlier run", rerun.stdout).group(1))  # type: ignore[union-attr]
    assert reused >= len(finished)
    # ... no chunk it had finished was computed again ...
    runs = succeeded(worker.log())
    for chunk in finished:
        assert sum(n for task, n in runs.items() if chunk_of(task) == chunk) == 1, (chunk, runs)
    # ... and the output is a clean run's
    assert_same_output(out, reference)
    assert json.loads(Path(f"{out}.manifest.json").read_text())["reused_chunks"] == reused
    if plan:
        chunks = json.loads(Path(f"{out}.manifest.json").read_text())["chunks"]
        assert chunks == 10  # the shrinking plan, cut the same way by both runs


@pytest.mark.timeout(90)
def test_redis_killed_and_restarted_with_aof_workers_reconnect_and_the_job_finishes(
    own_server: EmbeddedRedis,
    workers: WorkerFactory,
    producers: ProducerFactory,
    tiny_bert: Path,
    reference: np.ndarray,
    tmp_path: Path,
) -> None:
    # given a job under way on a Redis with AOF on
    broker = Broker(own_server.url, "aof", "valkey")
    worker = workers.start(worker_env(broker, tiny_bert, delay_s=0.2), concurrency=1)
    wait_ready(worker)
    out = tmp_path / "out.npy"
    producer = producers.embed(broker, tiny_bert, out)
    assert wait_until(lambda: len(deliveries(broker)) >= 3, 60), producer.stderr() + worker.log()[-2000:]

    # when Redis is SIGKILLed and started again on the same port, from its AOF
    own_server.kill()
    own_server.start()

    # then the worker reconnects by itself (never restarted) and the job finishes with a clean run's output
    assert producer.wait(80) == 0, producer.stderr() + worker.log()[-3000:]
    assert worker.process.poll() is None
    assert_same_output(out, reference)


@pytest.mark.timeout(90)
def test_redis_restarted_empty_the_producer_resends_the_lost_chunks(
    tmp_path: Path,
    workers: WorkerFactory,
    producers: ProducerFactory,
    tiny_bert: Path,
    reference: np.ndarray,
) -> None:
    # given a job under way on a Redis without persistence
    server = EmbeddedRedis(tmp_path / "valkey", appendonly=False).start()
    try:
        broker = Broker(server.url, "mem", "valkey")
        worker = workers.start(worker_env(broker, tiny_bert, delay_s=0.2), concurrency=1)
        wait_ready(worker)
        out = tmp_path / "out.npy"
        producer = producers.embed(broker, tiny_bert, out, "--stall-timeout", "30")
        assert wait_until(lambda: len(deliveries(broker)) >= 3, 60), producer.stderr() + worker.log()[-2000:]

        # when Redis is SIGKILLed and started again empty: every queued message and result is gone
        server.kill()
        server.start()
        assert not deliveries(broker)

        # then the producer notices (reconciling expected chunks against received ones), sends them again,
        # and reports complete only with every row in place
        assert producer.wait(80) == 0, producer.stderr() + worker.log()[-3000:]
        assert "sending chunk" in producer.stderr() and "again" in producer.stderr(), producer.stderr()
        assert json.loads(Path(f"{out}.manifest.json").read_text())["resent_chunks"] >= 1
        assert_same_output(out, reference)
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_lost_chunks_that_no_worker_finishes_fail_the_job_instead_of_reporting_it_complete(
    fault_broker: Broker,
    tmp_path: Path,
    tiny_bert: Path,
) -> None:
    # given no worker at all (the queued messages will never be taken)
    out = tmp_path / "out.npy"
    # when a job runs with a short stall timeout
    result = run_embedq(
        *embed_args(
            write_corpus(tmp_path / "in.jsonl", ["a", "b", "c"]),
            out,
            fault_broker.url,
            tiny_bert,
            "--stall-timeout",
            "1",
            "--no-worker-check",  # queue the job although no worker will ever take it
        ),
        env={"EMBEDQ_KEY_PREFIX": fault_broker.prefix},
        timeout=50,
    )
    # then after three sends it gives up with exit code 1, naming the rows, and writes no output
    assert result.returncode == 1, result.stderr
    assert "rows 0-2 (no worker finished it within --stall-timeout 1 s" in result.stderr, result.stderr
    assert "gave up after 3 sends" in result.stderr
    assert not out.exists()
