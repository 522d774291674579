"""A worker frozen mid-chunk (SIGSTOP, as a suspended VM) on this host, thawed after the job: no root needed.

The multi-host suite (tests/fleet) does the same across network namespaces; this one runs anywhere.
Real compute (the packaged MiniLM, one torch thread per worker), so that the freeze lands while the
worker holds a chunk, and embedq's default lease TTL: nothing is shortened.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Broker, WorkerFactory, wait_until
from tests.faults.conftest import ProducerFactory, wait_ready
from tests.fleet.conftest import CHUNK_ROWS, TEXTS

pytestmark = pytest.mark.slow


def _holders(broker: Broker) -> set[str]:
    client = broker.client()
    try:
        names = list(client.scan_iter(match=f"{broker.prefix}:lease:*"))
        return {json.loads(raw)["worker"] for raw in client.mget(names) if raw} if names else set()
    finally:
        client.close()


def _result_keys(broker: Broker) -> list[bytes]:
    client = broker.client()
    try:
        return list(client.scan_iter(match=f"{broker.prefix}:result:*"))
    finally:
        client.close()


def _embed(producers: ProducerFactory, broker: Broker, folder: Path) -> tuple[object, Path]:
    folder.mkdir()
    corpus = folder / "in.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    out = folder / "out.npy"
    args = ["embed", str(corpus), "-o", str(out), "--broker", broker.url, "--chunk-size", str(CHUNK_ROWS)]
    return producers.start(*args, env={"EMBEDQ_KEY_PREFIX": broker.prefix}), out


@pytest.mark.timeout(240)
def test_a_frozen_worker_thawed_after_the_job_drops_its_copy_and_serves_the_next_job(
    fault_broker: Broker, workers: WorkerFactory, producers: ProducerFactory, tmp_path: Path
) -> None:
    # given two workers on embedq's defaults and a job under way, with worker B holding a chunk
    env = fault_broker.env(torch_threads=1)
    a = workers.start(env, concurrency=1)
    b = workers.start(env, concurrency=1)
    wait_ready(a, timeout_s=120)
    wait_ready(b, timeout_s=120)
    producer, out = _embed(producers, fault_broker, tmp_path / "frozen")
    assert wait_until(lambda: b.hostname in _holders(fault_broker), 120, 0.05), b.log()[-2000:]

    # when B, main process and child, is SIGSTOPped until the job is over
    os.killpg(b.process.pid, signal.SIGSTOP)
    try:
        assert producer.wait(180) == 0, producer.stderr()[-3000:]  # type: ignore[attr-defined]
    finally:
        os.killpg(b.process.pid, signal.SIGCONT)

    # then the job completed exactly, B's chunk sent again because its lease went silent ...
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["resent_by_reason"].get("holder_silent", 0) >= 1, manifest
    assert manifest["ids"] == [f"doc-{i}" for i in range(len(TEXTS))]
    matrix = np.load(out)
    assert matrix.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    # ... B, thawed, drops its late copy and leaves no result key ...
    assert wait_until(lambda: "dropped without storing" in b.log(), 60, 0.5), b.log()[-3000:]
    assert wait_until(lambda: not _result_keys(fault_broker), 30, 0.5), _result_keys(fault_broker)
    # ... and serves the next job, whose output is the same
    done_before = len(re.findall(r"succeeded in [^\n]*'type': 'done'", b.log()))
    again, out2 = _embed(producers, fault_broker, tmp_path / "again")
    assert again.wait(180) == 0, again.stderr()[-3000:]  # type: ignore[attr-defined]
    assert len(re.findall(r"succeeded in [^\n]*'type': 'done'", b.log())) > done_before, b.log()[-3000:]
    np.testing.assert_allclose(np.load(out2), matrix, atol=1e-5)
    assert not _result_keys(fault_broker)
