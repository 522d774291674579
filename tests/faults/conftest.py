"""Fixtures for the fault suite: short delivery timeouts, a tiny model, producers that can be SIGKILLed.

Every fault test runs real processes (valkey-server, `celery -A tests.faults.fault_app worker`: the
production app plus the faults it is told to play, `python -m producer.cli embed`) and real signals;
nothing here is mocked. The timeouts are shortened so that
a redelivery takes seconds instead of an hour, keeping the time limits below the visibility timeout
as embedq requires.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from producer.local.embedded_redis import EmbeddedRedis
from tests.conftest import ROOT, Broker, WorkerFactory, WorkerProcess, wait_until, write_texts_jsonl

#: Redis gives an unacked message back after this long; time limits stay below it.
VISIBILITY_S = 5.0
FAULT_SETTINGS: dict[str, object] = {
    "visibility_timeout_s": VISIBILITY_S,
    "task_time_limit_s": 4.0,
    "task_soft_time_limit_s": 3.5,
}
TEXTS = [f"fault test document {i}: {'lorem ipsum ' * (i % 7)}dolor" for i in range(32)]
CHUNK = 4  # 8 chunks of 4 rows
#: The Celery app of every worker a fault test starts: production's, with faults played from test code.
FAULT_APP = "tests.faults.fault_app"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerFactory]:
    """Real workers of the fault app (without FAULT_* variables it is the production worker exactly)."""
    factory = WorkerFactory(tmp_path, app=FAULT_APP)
    yield factory
    factory.stop_all()


@pytest.fixture
def fault_broker(valkey: EmbeddedRedis) -> Iterator[Broker]:
    """The session's embedded Valkey with a key prefix of this test's own (never the machine's Redis:
    fault tests are about embedq's behaviour, and running each twice would not fit the time budget)."""
    result = Broker(valkey.url, f"f{uuid.uuid4().hex[:10]}", "valkey")
    yield result
    result.cleanup()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A private Valkey with AOF on (fsync always), for tests that kill and restart the server."""
    server = EmbeddedRedis(tmp_path / "valkey", appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reference(tiny_bert: Path) -> np.ndarray:
    """TEXTS embedded in-process by the tiny model: what every faulty run must still produce."""
    from workers.encoder import Encoder
    from workers.protocol.model_info import resolve_model

    return Encoder.load(resolve_model(str(tiny_bert)), "cpu").encode(TEXTS).embeddings


def write_corpus(path: Path, texts: list[str] = TEXTS) -> Path:
    return write_texts_jsonl(path, texts)


def worker_env(broker: Broker, tiny_bert: Path, *, delay_s: float = 0.0, **changes: object) -> dict[str, str]:
    env = broker.env(model=str(tiny_bert), **{**FAULT_SETTINGS, **changes})
    if delay_s:
        env["FAULT_CHUNK_DELAY_S"] = str(delay_s)
    return env


def wait_ready(worker: WorkerProcess, children: int = 1, timeout_s: float = 60.0) -> None:
    """Until `children` pool children have loaded the model (they log 'ready:')."""
    assert wait_until(lambda: worker.log().count("ready:") >= children, timeout_s), worker.log()[-3000:]


def succeeded(*logs: str) -> Counter[str]:
    """Task id -> times a worker logged it as succeeded (a late copy dropped unstored does not count)."""
    pattern = r"embedq\.embed_chunk\[([^\]]+)\] succeeded[^\n]*"
    return Counter(m.group(1) for log in logs for m in re.finditer(pattern, log) if "'dropped'" not in m.group(0))


def succeeded_chunks(*logs: str) -> Counter[int]:
    """Chunk -> times a worker stored it, whichever attempt (a re-sent copy has a new task id)."""
    return Counter(chunk_of(task) for task, n in succeeded(*logs).items() for _ in range(n))


def received(log: str) -> list[str]:
    """Task ids a worker received, in order."""
    return re.findall(r"embedq\.embed_chunk\[([^\]]+)\] received", log)


def first_received(worker: WorkerProcess, timeout_s: float = 60.0) -> str:
    """The id of the first chunk task `worker` received (logged by its main process, before a child runs it)."""
    assert wait_until(lambda: received(worker.log()), timeout_s), worker.log()[-2000:]
    return received(worker.log())[0]


def wait_started(broker: Broker, worker: WorkerProcess, task_id: str, timeout_s: float = 30.0) -> None:
    """Until a pool child has started chunk task `task_id` (the deliveries counter counts starts)."""
    assert wait_until(lambda: chunk_of(task_id) in deliveries(broker), timeout_s), worker.log()[-2000:]


def chunk_of(task_id: str) -> int:
    """Task ids read `job-chunk-attempt` (producer/job/broker.py)."""
    return int(task_id.rsplit("-", 2)[1])


def deliveries(broker: Broker) -> dict[int, int]:
    """Chunk -> starts so far, summed over the fields of every deliveries hash under this prefix."""
    client = broker.client()
    try:
        totals: Counter[int] = Counter()
        for key in client.scan_iter(match=f"{broker.prefix}:deliveries:*"):
            for name, count in client.hgetall(key).items():
                totals[int(name.decode().split(":", 1)[0])] += int(count)
        return dict(totals)
    finally:
        client.close()


@dataclass
class ProducerProcess:
    """`embedq embed` running in the background, so that a test can signal it mid-job."""

    process: subprocess.Popen[str]
    out_path: Path
    err_path: Path

    def wait(self, timeout_s: float = 120.0) -> int:
        return self.process.wait(timeout=timeout_s)

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


@dataclass
class ProducerFactory:
    tmp_path: Path
    started: list[ProducerProcess] = field(default_factory=list)

    def start(self, *args: str, env: dict[str, str] | None = None) -> ProducerProcess:
        n = len(self.started)
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")},
            "PYTHONPATH": str(ROOT),
            **(env or {}),
        }
        out, err = self.tmp_path / f"producer-{n}.out", self.tmp_path / f"producer-{n}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "producer.cli", *args],
                env=full_env,
                text=True,
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
            )
        producer = ProducerProcess(process, out, err)
        self.started.append(producer)
        return producer

    def embed(
        self, broker: Broker, tiny_bert: Path, out: Path, *extra: str, texts: list[str] = TEXTS
    ) -> ProducerProcess:
        """`embedq embed` of `texts` into `out` through `broker` (and its key prefix), in the background."""
        corpus = write_corpus(out.parent / "in.jsonl", texts)
        return self.start(
            *embed_args(corpus, out, broker.url, tiny_bert, *extra), env={"EMBEDQ_KEY_PREFIX": broker.prefix}
        )

    def stop_all(self) -> None:
        for producer in self.started:
            if producer.process.poll() is None:
                producer.process.send_signal(signal.SIGKILL)
                producer.process.wait(timeout=10)


@pytest.fixture
def producers(tmp_path: Path) -> Iterator[ProducerFactory]:
    factory = ProducerFactory(tmp_path)
    yield factory
    factory.stop_all()


def embed_args(corpus: Path, out: Path, broker_url: str, tiny_bert: Path, *extra: str) -> list[str]:
    return [
        "embed",
        str(corpus),
        "-o",
        str(out),
        "--broker",
        broker_url,
        "--model",
        str(tiny_bert),
        "--chunk-size",
        str(CHUNK),
        *extra,
        # Workers may still be starting when the producer is: it waits for them, as such a user would ask.
        *([] if "--no-worker-check" in extra else ["--wait-for-workers", "120"]),
    ]


def assert_same_output(out: Path, reference: np.ndarray) -> None:
    """The output a clean run gives: every row once, in order, equal to the in-process reference."""
    matrix = np.load(out)
    assert matrix.shape == reference.shape
    np.testing.assert_allclose(matrix, reference, atol=1e-5)
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["ids"] == [f"doc-{i}" for i in range(reference.shape[0])]
    assert not list(out.parent.glob(out.name + ".partial*"))
