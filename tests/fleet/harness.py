"""The fleet on namespaced hosts, as tests and the fleet benchmark drive it: start workers, run jobs, look.

Built on tests/fleet/netns.py. Workers run embedq's defaults (nothing shortened) with one pool child
and one torch thread per host; the producer runs in the root namespace, as `embedq embed`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from producer.local.cluster import worker_command
from tests.conftest import ROOT, wait_until, write_texts_jsonl
from tests.fleet.netns import Host, Network
from workers.protocol.keys import Keys
from workers.protocol.liveness import live_workers

#: 24 chunks of 32 documents: about 0.3-0.6 s of compute per chunk on one thread.
TEXTS = [f"fleet document {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 6) for i in range(768)]
CHUNK_ROWS = 32


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

    def start_job(
        self, name: str, *extra: str, texts: list[str] = TEXTS, corpus: Path | None = None, chunk_rows: int = CHUNK_ROWS
    ) -> tuple[subprocess.Popen[str], Path]:
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        corpus = corpus or write_texts_jsonl(folder / "in.jsonl", texts)
        out = folder / "out.npy"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")},
            "PYTHONPATH": str(ROOT),
            "EMBEDQ_KEY_PREFIX": self.prefix,
        }
        command = [sys.executable, "-m", "producer.cli", "embed", str(corpus), "-o", str(out), "--broker", self.url]
        process = subprocess.Popen(
            # --wait-for-workers: hosts may still be starting their workers when a job is sent
            [*command, "--chunk-size", str(chunk_rows), "--no-progress", "--wait-for-workers", "60", *extra],
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

    def run_job(self, name: str, *extra: str, **job: object) -> JobRun:
        started = time.monotonic()
        process, out = self.start_job(name, *extra, **job)  # type: ignore[arg-type]
        return self.finish(process, out, started)

    def wait_all_alive(self, timeout_s: float = 90) -> None:
        assert wait_until(lambda: self.alive() == set(self.hosts), timeout_s, 0.5), (
            f"alive: {self.alive()}; " + " | ".join(f"{h}: {self.log(h)[-1500:]}" for h in self.hosts)
        )

    def start_worker(self, name: str) -> None:
        """A worker on host `name`: one pool child, one torch thread, embedq's defaults otherwise."""
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")},
            "PYTHONPATH": str(ROOT),
            "EMBEDQ_BROKER_URL": self.url,
            "EMBEDQ_KEY_PREFIX": self.prefix,
            "EMBEDQ_TORCH_THREADS": "1",
        }
        host = self.hosts[name]
        host.run(worker_command(1, hostname=f"worker@{name}", loglevel="INFO"), env=env, log_path=self.logs[name])


def start_fleet(tmp: Path, worker_hosts: tuple[str, ...], *, start_workers: bool = True) -> Fleet:
    """Redis on a host of its own and one worker per named host; the caller closes `fleet.network`."""
    network = Network(tmp / "hosts")
    try:
        url = network.start_redis(network.add_host("redis", 1))
        hosts = {name: network.add_host(name, number) for number, name in enumerate(worker_hosts, start=11)}
        fleet = Fleet(network, url, f"fl{uuid.uuid4().hex[:8]}", hosts, {n: tmp / f"{n}.log" for n in hosts}, tmp)
        if start_workers:
            for name in hosts:
                fleet.start_worker(name)
            fleet.wait_all_alive(120)
            assert wait_until(lambda: all("ready:" in fleet.log(h) for h in hosts), 120, 0.5)
        return fleet
    except BaseException:
        network.close()
        raise
