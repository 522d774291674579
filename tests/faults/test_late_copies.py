"""First result wins: a copy of a chunk that arrives after its job ended is acked without running the model.

Redis brings an unacked message back once its visibility timeout passes (an hour by default), and a
host healed after a partition may still hold one: the message reaches a worker long after the job
is over. Real worker, real broker, a real task message sent as the producer sends it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from producer.job.broker import send_chunk, sender_app
from tests.conftest import Broker, WorkerFactory, wait_until
from tests.faults.conftest import ProducerFactory, assert_same_output, deliveries, wait_ready, worker_env
from workers.protocol.queues import BULK
from workers.protocol.routing import queue_name

pytestmark = pytest.mark.slow


@pytest.mark.timeout(120)
def test_a_message_redelivered_after_its_job_finished_is_acked_unrun_and_leaves_no_key(
    fault_broker: Broker,
    workers: WorkerFactory,
    producers: ProducerFactory,
    tiny_bert: Path,
    reference: np.ndarray,
    tmp_path: Path,
) -> None:
    # given a finished job
    worker = workers.start(worker_env(fault_broker, tiny_bert), concurrency=1)
    wait_ready(worker)
    out = tmp_path / "out.npy"
    producer = producers.embed(fault_broker, tiny_bert, out)
    assert producer.wait(90) == 0, producer.stderr()
    assert_same_output(out, reference)
    job = json.loads(Path(f"{out}.manifest.json").read_text())["job"]
    starts_before = deliveries(fault_broker)

    # when a copy of its chunk 0 reaches a worker again (as Redis' redelivery an hour later would)
    app = sender_app(fault_broker.settings())
    bulk = queue_name(BULK, tiny_bert.name)  # the tiny model's own queue (workers/protocol/routing.py)
    send_chunk(app, job, 0, ["a late copy"], {"model": tiny_bert.name}, queue=bulk, attempt=7)

    # then the worker acks it without running the model: no start is counted, nothing is stored,
    # no event is published, and the output does not change
    assert wait_until(lambda: "attempt 7 dropped without storing: its job is done" in worker.log(), 60), worker.log()[
        -3000:
    ]
    assert deliveries(fault_broker) == starts_before
    client = fault_broker.client()
    try:
        assert not list(client.scan_iter(match=f"{fault_broker.prefix}:result:*"))
        assert client.llen(f"{fault_broker.prefix}:events:{job}") == 0
        assert client.hget(f"{fault_broker.prefix}:stats", "copies_dropped") == b"1"
    finally:
        client.close()
    assert_same_output(out, reference)
