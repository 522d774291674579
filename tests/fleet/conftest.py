"""Fixtures for the multi-host suite: Redis and two worker hosts in network namespaces, on defaults.

The fleet is built once per module (starting workers with a real model is the slow part) and each test
leaves it healthy for the next one: healed, thawed, unthrottled, both workers alive again. Workers
run the packaged all-MiniLM-L6-v2 with one pool child and one torch thread per host, so that a chunk
takes real compute time and a fault lands while a chunk is held. No timeout is shortened: the lease
TTL, broker timeouts and visibility timeout are embedq's defaults.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis

from producer.local_cluster import worker_command
from tests.conftest import ROOT, wait_until, write_texts_jsonl
from tests.fleet.netns import Host, Network, unavailable_reason
from workers.keys import Keys
from workers.liveness import live_workers

#: 24 chunks of 32 documents: about 0.3-0.6 s of compute per chunk on one thread.
TEXTS = [f"fleet document {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 6) for i in range(768)]
CHUNK_ROWS = 32
WORKER_HOSTS = ("host1", "host2")


def require_namespaces() -> None:
    """Skip where namespaces cannot be made; under CI=true that is a failure, not a skip."""
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the multi-host suite: {reason}")
        pytest.skip(reason)


@dataclass
class JobRun:
    """One finished `embedq embed` run from the producer's (root) namespace."""

    code: int
    stdout: str
    stderr: str
    out: Path
    wall_s: float

    def manifest(self) -> dict[str, object]:
        return dict(json.loads(Path(f"{self.out}.manifest.json").read_text()))

    def matrix(self) -> np.ndarray:
        return np.load(self.out)


@dataclass
class Fleet:
    network: Network
    url: str
    prefix: str
    hosts: dict[str, Host]
    logs: dict[str, Path]
    tmp: Path

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def alive(self) -> set[str]:
        client = self.client()
        try:
            return {str(w["hostname"]).split("@", 1)[1] for w in live_workers(client, Keys(self.prefix))}
        finally:
            client.close()

    def log(self, host: str) -> str:
        return self.logs[host].read_text(errors="replace") if self.logs[host].exists() else ""

    def succeeded(self, host: str) -> int:
        return len(re.findall(r"embedq\.embed_chunk\[[^\]]+\] succeeded", self.log(host)))

    def result_keys(self) -> list[bytes]:
        client = self.client()
        try:
            return list(client.scan_iter(match=f"{self.prefix}:result:*", count=1000))
        finally:
            client.close()

    def holders(self) -> set[str]:
        """Hosts holding a chunk lease right now."""
        client = self.client()
        try:
            names = list(client.scan_iter(match=f"{self.prefix}:lease:*", count=1000))
            records = [json.loads(raw) for raw in client.mget(names) if raw] if names else []
            return {str(r.get("host")) for r in records}
        finally:
            client.close()

    def start_job(self, name: str, *extra: str, texts: list[str] = TEXTS) -> tuple[subprocess.Popen[str], Path]:
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        corpus = write_texts_jsonl(folder / "in.jsonl", texts)
        out = folder / "out.npy"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")},
            "PYTHONPATH": str(ROOT),
            "EMBEDQ_KEY_PREFIX": self.prefix,
        }
        command = [sys.executable, "-m", "producer.cli", "embed", str(corpus), "-o", str(out), "--broker", self.url]
        process = subprocess.Popen(
            # --wait-for-workers: hosts may still be starting their workers when a job is sent
            [*command, "--chunk-size", str(CHUNK_ROWS), "--no-progress", "--wait-for-workers", "60", *extra],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        return process, out

    def finish(self, process: subprocess.Popen[str], out: Path, started: float, timeout_s: float = 180) -> JobRun:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            raise AssertionError(f"job did not finish in {timeout_s} s: {stderr[-3000:]}") from None
        return JobRun(process.returncode, stdout, stderr, out, time.monotonic() - started)

    def run_job(self, name: str, *extra: str) -> JobRun:
        started = time.monotonic()
        process, out = self.start_job(name, *extra)
        return self.finish(process, out, started)

    def wait_all_alive(self, timeout_s: float = 90) -> None:
        assert wait_until(lambda: self.alive() == set(self.hosts), timeout_s, 0.5), (
            f"alive: {self.alive()}; " + " | ".join(f"{h}: {self.log(h)[-1500:]}" for h in self.hosts)
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    require_namespaces()
    tmp = tmp_path_factory.mktemp("fleet")
    network = Network(tmp / "hosts")
    try:
        url = network.start_redis(network.add_host("redis", 1))
        prefix = f"fl{uuid.uuid4().hex[:8]}"
        hosts, logs = {}, {}
        for number, name in enumerate(WORKER_HOSTS, start=11):
            host = hosts[name] = network.add_host(name, number)
            logs[name] = tmp / f"{name}.log"
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")},
                "PYTHONPATH": str(ROOT),
                "EMBEDQ_BROKER_URL": url,
                "EMBEDQ_KEY_PREFIX": prefix,
                "EMBEDQ_TORCH_THREADS": "1",
            }
            host.run(worker_command(1, hostname=f"worker@{name}", loglevel="INFO"), env=env, log_path=logs[name])
        result = Fleet(network, url, prefix, hosts, logs, tmp)
        result.wait_all_alive(120)
        assert wait_until(lambda: all("ready:" in result.log(h) for h in hosts), 120, 0.5)
        yield result
    finally:
        network.close()


@pytest.fixture(scope="module")
def clean_run(fleet: Fleet) -> JobRun:
    """The job with no fault: what every faulty run must reproduce, row for row."""
    run = fleet.run_job("clean")
    assert run.code == 0, run.stderr[-3000:]
    assert run.manifest()["resent_chunks"] == 0, run.manifest()
    return run


def assert_same_output(run: JobRun, clean: JobRun) -> None:
    """Every row once, in order, equal to the clean run's; ids in order; no partial file left."""
    assert run.code == 0, run.stderr[-3000:]
    matrix = run.matrix()
    assert matrix.shape == clean.matrix().shape
    np.testing.assert_allclose(matrix, clean.matrix(), atol=1e-5)
    manifest = run.manifest()
    assert manifest["ids"] == [f"doc-{i}" for i in range(len(TEXTS))]
    assert not list(run.out.parent.glob(run.out.name + ".partial*"))
