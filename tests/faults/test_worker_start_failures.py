"""Workers that cannot serve: too little memory, an unknown model, an unreachable hub, a load slower than
the alive timeout. Each must exit fast with one clear line and exit code 78, consuming no task; and a
CUDA out-of-memory error halves the batch instead of failing the chunk.
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from producer.job.broker import send_chunk, sender_app
from producer.local.embedded_redis import free_port
from tests.conftest import Broker, WorkerFactory, WorkerProcess
from tests.faults.conftest import wait_ready, worker_env
from workers.lifecycle.startup import EXIT_WORKER_CONFIG
from workers.protocol.keys import Keys

pytestmark = pytest.mark.slow


def _queue_a_chunk(broker: Broker, tiny_bert: Path) -> str:
    """One chunk waiting in `bulk` before the worker starts: it must still be there when the worker is gone."""
    job = "waiting"
    send_chunk(sender_app(broker.settings()), job, 0, ["hello"], {"model": tiny_bert.name}, queue="bulk")
    return job


def _assert_failed_fast_and_consumed_nothing(
    worker: WorkerProcess, broker: Broker, job: str, loaded: int = 0
) -> list[str]:
    """The worker exited 78 by itself, saying why in one line; the queued chunk was never started."""
    code = worker.wait(60)
    log = worker.log()
    assert code == EXIT_WORKER_CONFIG, log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith("embedq worker:")]
    assert len(lines) == 1, log[-3000:]  # one line, not one per respawned child
    assert log.count("ready:") == loaded
    client = broker.client()
    assert not client.exists(Keys(broker.prefix).deliveries(job))  # never executed
    queued = client.llen(f"{broker.prefix}:bulk") + client.hlen(f"{broker.prefix}:unacked")
    assert queued == 1, "the chunk must stay with the broker for a healthy worker"
    return lines


@pytest.mark.timeout(60)
def test_a_model_too_big_for_the_memory_stops_the_worker_with_the_numbers(
    fault_broker: Broker, workers: WorkerFactory, tiny_bert: Path
) -> None:
    # given a machine with 1000 MiB available (played by the fault app) and the default model
    job = _queue_a_chunk(fault_broker, tiny_bert)
    env = fault_broker.env(model="")
    env["FAULT_AVAILABLE_MEMORY_BYTES"] = str(1000 * 2**20)
    # when a worker with two children starts
    worker = workers.start(env, concurrency=2)
    # then it refuses before forking a child, in one line naming the numbers and what to change
    (line,) = _assert_failed_fast_and_consumed_nothing(worker, fault_broker, job)
    assert "model all-MiniLM-L6-v2 needs about" in line and "x 2 children" in line, line
    assert "only 1000 MiB is available" in line and "(--concurrency 1 fits)" in line, line
    assert "--batch-tokens" in line and "smaller model" in line


@pytest.mark.timeout(60)
def test_an_unknown_model_stops_the_worker_before_any_child(
    fault_broker: Broker, workers: WorkerFactory, tiny_bert: Path, tmp_path: Path
) -> None:
    job = _queue_a_chunk(fault_broker, tiny_bert)
    worker = workers.start(fault_broker.env(model=str(tmp_path / "no-such-model")), concurrency=2)
    (line,) = _assert_failed_fast_and_consumed_nothing(worker, fault_broker, job)
    assert "no-such-model" in line and "no such folder" in line, line


@pytest.mark.timeout(60)
def test_an_unreachable_hub_stops_the_worker_before_any_child(
    fault_broker: Broker, workers: WorkerFactory, tiny_bert: Path
) -> None:
    # given a hub model name and a hub endpoint where nothing listens
    job = _queue_a_chunk(fault_broker, tiny_bert)
    env = fault_broker.env(model="some-org/some-model")
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HUB_ETAG_TIMEOUT="3")
    worker = workers.start(env, concurrency=2)
    (line,) = _assert_failed_fast_and_consumed_nothing(worker, fault_broker, job)
    assert "cannot reach the Hugging Face hub for some-org/some-model" in line, line


@pytest.mark.timeout(90)
def test_a_model_load_slower_than_the_alive_timeout_stops_the_worker_instead_of_respawning(
    fault_broker: Broker, workers: WorkerFactory, tiny_bert: Path
) -> None:
    # given children that take 3 s to load (played by the fault app) and Celery's alive timeout at 1 s, which
    # Celery applies to replacement children (the first ones may take their time)
    env = worker_env(fault_broker, tiny_bert, proc_alive_timeout_s=1.0)
    env["FAULT_LOAD_DELAY_S"] = "3"
    worker = workers.start(env, concurrency=1)
    wait_ready(worker)
    # when the child dies (as under the OOM killer) and a chunk waits in the queue
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)
    job = _queue_a_chunk(fault_broker, tiny_bert)
    # then Celery SIGKILLs the slow replacement at 1 s, and the next replacement sees its predecessor died
    # loading and stops the worker, naming the setting, instead of respawning forever
    (line,) = _assert_failed_fast_and_consumed_nothing(worker, fault_broker, job, loaded=1)
    assert "died while loading model" in line and "EMBEDQ_PROC_ALIVE_TIMEOUT_S=1 s" in line, line
    assert worker.log().count("Timed out waiting for UP message") == 1


def test_cuda_out_of_memory_halves_the_batch_and_retries(tiny_bert: Path) -> None:
    """No GPU can run here, so CUDA's out-of-memory error is raised by Encoder.forward_hook, the one
    injection point the encoder offers; everything else (tokenizer, model, packing) is real."""
    from workers.encoder import Encoder
    from workers.protocol.model_info import resolve_model

    encoder = Encoder.load(resolve_model(str(tiny_bert)), "cpu")
    texts = [f"sentence number {i} " + "x " * (i % 5) for i in range(16)]
    expected = encoder.encode(texts).embeddings
    seen: list[int] = []

    def out_of_memory_above_four_rows(input_ids: torch.Tensor) -> None:
        seen.append(int(input_ids.shape[0]))
        if input_ids.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # when every batch over four rows runs out of memory
    encoder.forward_hook = out_of_memory_above_four_rows
    result = encoder.encode(texts, batch_tokens=4096)
    # then the batch was halved until it fit, and the rows are exactly those of an unconstrained run
    assert seen == [16, 8, 4, 4, 8, 4, 4]
    np.testing.assert_allclose(result.embeddings, expected, atol=1e-5)


def test_the_gpu_memory_check_asks_nvidia_smi_not_torch(tmp_path: Path, tiny_bert: Path) -> None:
    """No GPU here: a stand-in `nvidia-smi` on PATH reports 1 MiB free, as the real one would print it."""
    from workers.lifecycle import memory
    from workers.protocol.config import Settings
    from workers.protocol.errors import InsufficientMemory
    from workers.protocol.model_info import resolve_model

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{tmp_path}:{old_path}"
    try:
        assert memory.gpu_free_bytes() == 2**20
        with pytest.raises(InsufficientMemory, match=r"of GPU memory for 2 children, but the GPU has 1 MiB free"):
            memory.check_fits(resolve_model(str(tiny_bert)), Settings(device="cuda"), children=2)
        memory.check_fits(resolve_model(str(tiny_bert)), Settings(device="cpu"), children=2)  # CPU: not asked
    finally:
        os.environ["PATH"] = old_path
