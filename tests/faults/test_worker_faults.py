"""Killed pool children, killed workers, warm shutdown, and a chunk that kills its worker every time.

Real `celery -A tests.faults.fault_app worker` processes (the production app, with faults played by
test code) on a real valkey-server, real signals, the real CLI; the output of every run must equal a
clean run's.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Broker, WorkerFactory, wait_until
from tests.faults.conftest import (
    TEXTS,
    ProducerFactory,
    assert_same_output,
    chunk_of,
    deliveries,
    first_received,
    succeeded,
    succeeded_chunks,
    wait_ready,
    wait_started,
    worker_env,
)

pytestmark = pytest.mark.slow

#: Celery notices a dead child on its next pool check, which can come later than the fault suite's
#: 4 s hard time limit; a chunk whose child died would then count as timed out (acked, not requeued).
#: Tests that kill children and do not need a short visibility timeout keep the limits roomy.
ROOMY_LIMITS = {"visibility_timeout_s": 60.0, "task_time_limit_s": 40.0, "task_soft_time_limit_s": 30.0}


@pytest.mark.timeout(90)
def test_sigkill_of_a_pool_child_mid_chunk_is_redone_by_a_new_child(
    fault_broker: Broker,
    workers: WorkerFactory,
    producers: ProducerFactory,
    tiny_bert: Path,
    reference: np.ndarray,
    tmp_path: Path,
) -> None:
    # given one worker whose single child takes a while over each chunk, and a job under way
    worker = workers.start(worker_env(fault_broker, tiny_bert, delay_s=0.4, **ROOMY_LIMITS), concurrency=1)
    wait_ready(worker)
    out = tmp_path / "out.npy"
    producer = producers.embed(fault_broker, tiny_bert, out)
    assert wait_until(lambda: len(deliveries(fault_broker)) >= 3, 60), producer.stderr() + worker.log()[-2000:]
    started = deliveries(fault_broker)
    running = max(started)  # the child is asleep inside the chunk it started last

    # when the child is SIGKILLed mid-chunk, as the out-of-memory killer would
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)

    # then the same chunk is started a second time (by a new child that loads the model again) ...
    assert wait_until(lambda: deliveries(fault_broker).get(running, 0) >= 2, 60), worker.log()[-3000:]
    assert producer.wait(90) == 0, producer.stderr() + worker.log()[-3000:]
    assert worker.log().count("ready:") == 2, worker.log()
    assert child not in worker.children()
    # ... and the output is exactly a clean run's: every row once, in order
    assert_same_output(out, reference)


@pytest.mark.timeout(90)
def test_sigkill_of_a_whole_worker_leaves_its_chunk_to_the_other_worker_within_seconds(
    fault_broker: Broker,
    workers: WorkerFactory,
    producers: ProducerFactory,
    tiny_bert: Path,
    reference: np.ndarray,
    tmp_path: Path,
) -> None:
    # given a slow worker A and a fast worker B sharing one job
    slow = workers.start(worker_env(fault_broker, tiny_bert, delay_s=1.5), concurrency=1)
    fast = workers.start(worker_env(fault_broker, tiny_bert), concurrency=1)
    wait_ready(slow)
    out = tmp_path / "out.npy"
    producer = producers.embed(fault_broker, tiny_bert, out)
    taken = first_received(slow)

    # when A, main process and children, is SIGKILLed while it holds a chunk unacknowledged
    os.killpg(slow.process.pid, signal.SIGKILL)
    slow.process.wait(10)

    # then B runs that chunk once (Redis gives it back, or the producer sends it again when A's lease
    # expires, whichever comes first), and the job completes with a clean run's output
    assert producer.wait(90) == 0, producer.stderr() + fast.log()[-3000:]
    assert succeeded_chunks(fast.log())[chunk_of(taken)] >= 1, fast.log()[-3000:]
    assert succeeded(slow.log())[taken] == 0
    assert_same_output(out, reference)


@pytest.mark.timeout(90)
def test_warm_shutdown_mid_job_finishes_the_running_chunk_and_leaves_the_rest_to_others(
    fault_broker: Broker,
    workers: WorkerFactory,
    producers: ProducerFactory,
    tiny_bert: Path,
    reference: np.ndarray,
    tmp_path: Path,
) -> None:
    # given a slow worker A and a fast worker B sharing one job
    slow = workers.start(worker_env(fault_broker, tiny_bert, delay_s=1.5), concurrency=1)
    fast = workers.start(worker_env(fault_broker, tiny_bert), concurrency=1)
    wait_ready(slow)
    out = tmp_path / "out.npy"
    producer = producers.embed(fault_broker, tiny_bert, out)
    running = first_received(slow)
    # "received" is logged before a child takes the chunk; a SIGTERM in between rightly hands it back
    wait_started(fault_broker, slow, running)

    # when A gets SIGTERM (a warm shutdown) while its chunk runs
    slow.process.send_signal(signal.SIGTERM)

    # then A finishes that chunk before it exits, and takes no other
    assert slow.wait(30) == 0, slow.log()[-3000:]
    assert succeeded(slow.log()) == {running: 1}, slow.log()[-3000:]
    # and B does the rest: the job completes once, with a clean run's output
    assert producer.wait(90) == 0, producer.stderr() + fast.log()[-3000:]
    assert sum(succeeded(slow.log(), fast.log()).values()) == len(TEXTS) // 4
    assert_same_output(out, reference)


@pytest.mark.timeout(90)
def test_a_warm_shutdown_that_hangs_is_ended_after_the_hard_time_limit_plus_a_grace(
    fault_broker: Broker,
    workers: WorkerFactory,
    producers: ProducerFactory,
    tiny_bert: Path,
    reference: np.ndarray,
    tmp_path: Path,
) -> None:
    # given a worker A whose shutdown hangs for 60 s once its pool has stopped (injected: CI saw a
    # warm shutdown hang once and it would not reproduce), a normal worker B, and a job under way
    env = worker_env(fault_broker, tiny_bert, delay_s=1.5)
    env["FAULT_SHUTDOWN_HANG_S"] = "60"
    hanging = workers.start(env, concurrency=1)
    wait_ready(hanging)
    out = tmp_path / "out.npy"
    producer = producers.embed(fault_broker, tiny_bert, out)
    running = first_received(hanging)
    wait_started(fault_broker, hanging, running)
    workers.start(worker_env(fault_broker, tiny_bert), concurrency=1)

    # when A gets SIGTERM mid-chunk
    children = hanging.children()
    hanging.process.send_signal(signal.SIGTERM)

    # then A still finishes its chunk, and exits by itself 4 s (hard limit) + 10 s (grace) after the
    # signal rather than after the hang, saying so in one line and leaving no pool child behind
    assert hanging.wait(30) == 0, hanging.log()[-3000:]
    assert succeeded(hanging.log()) == {running: 1}, hanging.log()[-3000:]
    assert "embedq worker: warm shutdown still not finished after 14 s" in hanging.log(), hanging.log()[-3000:]
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    # and the job completes on B with a clean run's output
    assert producer.wait(60) == 0, producer.stderr()
    assert_same_output(out, reference)


@pytest.mark.timeout(60)
def test_a_stopped_worker_still_runs_celerys_exit_handlers_and_keeps_its_exit_code(
    fault_broker: Broker, workers: WorkerFactory, tiny_bert: Path, tmp_path: Path
) -> None:
    # given a worker with a pidfile (Celery removes it in an atexit handler)
    pidfile = tmp_path / "worker.pid"
    worker = workers.start(worker_env(fault_broker, tiny_bert), extra_args=["--pidfile", str(pidfile)])
    wait_ready(worker)
    assert pidfile.read_text().strip() == str(worker.process.pid)

    # when it is stopped (embedq skips the interpreter's teardown after the shutdown, which takes seconds
    # with torch imported)
    worker.process.send_signal(signal.SIGTERM)

    # then it exits 0 and the exit handlers that Celery registered still ran
    assert worker.wait(30) == 0, worker.log()[-3000:]
    assert not pidfile.exists(), worker.log()[-3000:]


@pytest.mark.timeout(120)
def test_a_chunk_that_kills_its_worker_three_times_is_quarantined_and_the_job_names_its_rows(
    fault_broker: Broker,
    workers: WorkerFactory,
    producers: ProducerFactory,
    tiny_bert: Path,
    tmp_path: Path,
) -> None:
    # given a corpus with one poison text (the fault app: a child given it SIGKILLs itself, like an OOM kill)
    texts = list(TEXTS)
    texts[9] = "POISON-PILL " + texts[9]  # row 9 is in chunk 2: rows 8-11
    env = worker_env(fault_broker, tiny_bert, **ROOMY_LIMITS)
    env["FAULT_KILL_ON_TEXT"] = "POISON-PILL"
    worker = workers.start(env, concurrency=1)
    out = tmp_path / "out.npy"

    # when the job runs
    producer = producers.embed(fault_broker, tiny_bert, out, texts=texts)

    # then it ends with exit code 1, naming the quarantined rows and why, and writes no output
    assert producer.wait(110) == 1, producer.stderr() + worker.log()[-3000:]
    stderr = producer.stderr()
    assert "rows 8-11 (quarantined: " in stderr and "died 3 times" in stderr, stderr
    assert "1 of 8 chunks failed" in stderr, stderr
    assert not out.exists()
    # and the rest of the job completed: every other chunk ran exactly once; the poison one never succeeded
    done = succeeded(worker.log())
    assert sorted(chunk_of(task) for task in done) == [0, 1, 2, 3, 4, 5, 6, 7]  # chunk 2: its quarantine
    assert worker.log().count("exited with 'signal 9 (SIGKILL)'") == 3, stderr + worker.log()[-3000:]
    # and the worker itself survived it
    assert worker.process.poll() is None
