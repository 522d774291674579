"""Latency of one-sentence interactive requests, idle and while a bulk job keeps every worker busy.

    .venv/bin/python bench/latency.py [--workers 2] [--requests 50] [--bulk-chunk-rows 256] [--reserved 1]

Starts an embedded cluster (Valkey + one worker with N pool children, the packaged MiniLM, plus
`--reserved` interactive-only children, as `embedq up` runs them), then:
1. idle: N requests through `EmbedClient`, one after another;
2. busy: the `bulk` queue is kept full of corpus chunks (producer/samples/sample.jsonl) so that every
   child is always embedding one, and the same requests are timed again, at random moments.
Prints p50/p95 of both and the mean bulk chunk time (the longest an interactive request should wait).
Targets (README, Lanes): busy p95 <= 1.5 s, idle p50 <= 0.6 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from producer.job.broker import send_chunk, sender_app  # noqa: E402
from producer.local.cluster import LocalCluster, start_process  # noqa: E402
from producer.local.up import interactive_worker  # noqa: E402
from producer.serve.client import EmbedClient  # noqa: E402
from producer.serve.metrics import queue_depth  # noqa: E402
from workers.protocol.config import Settings  # noqa: E402
from workers.protocol.keys import Keys, connect  # noqa: E402
from workers.protocol.model_info import resolve_model  # noqa: E402
from workers.protocol.queues import BULK  # noqa: E402
from workers.protocol.routing import queue_name  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def timed_requests(client: EmbedClient, count: int, jitter_s: float) -> list[float]:
    latencies = []
    for i in range(count):
        if jitter_s:
            time.sleep(random.uniform(0, jitter_s))  # land at random points of the running bulk chunks
        started = time.perf_counter()
        client.embed([f"how long does request {i} wait behind bulk work? {random.random()}"], timeout=60)
        latencies.append(time.perf_counter() - started)
    return latencies


class BulkLoad:
    """Keeps the bulk queue topped up with corpus chunks until stopped; records their run times."""

    def __init__(self, settings: Settings, chunk_rows: int, backlog: int) -> None:
        self.settings = settings
        self.app = sender_app(settings)
        self.redis = connect(settings.broker_url)
        self.keys = Keys(settings.key_prefix)
        texts = [json.loads(line)["text"] for line in (ROOT / "producer/samples/sample.jsonl").open()]
        self.chunks = [texts[i : i + chunk_rows] for i in range(0, len(texts), chunk_rows)]
        model = resolve_model(settings.model)
        self.options = {
            "model": model.name,
            "pooling": model.pooling,
            "max_length": model.max_length,
            "normalize": True,
            "results": "redis",
        }
        self.backlog = backlog
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            bulk = queue_name(BULK, self.options["model"])  # the model's own bulk queue
            while queue_depth(self.redis, self.keys, bulk) < self.backlog:
                texts = self.chunks[self.sent % len(self.chunks)]
                send_chunk(self.app, "bench-bulk", self.sent, texts, self.options, queue=bulk)
                self.sent += 1
            self.stop.wait(0.05)

    def chunk_ms(self) -> list[float]:
        raw = self.redis.lrange(self.keys.events("bench-bulk"), 0, -1)
        return [json.loads(item)["ms"] for item in raw if json.loads(item).get("type") == "done"]

    def cleanup(self) -> None:
        for key in self.redis.scan_iter(match=f"{self.keys.prefix}:result:bench-bulk:*", count=500):
            self.redis.delete(key)
        self.redis.delete(self.keys.events("bench-bulk"), self.keys.deliveries("bench-bulk"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=max(1, len(os.sched_getaffinity(0))))
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--bulk-chunk-rows", type=int, default=256, help="documents per bulk chunk")
    parser.add_argument("--reserved", type=int, default=1, help="interactive-only pool children (0: none)")
    args = parser.parse_args()
    random.seed(0)

    with LocalCluster(Settings(), concurrency=args.workers) as cluster:
        settings = Settings(broker_url=cluster.broker_url)
        if args.reserved:
            command, env = interactive_worker(settings, args.reserved, f"bench-interactive-{os.getpid()}@%h")
            cluster.processes.append(start_process(command, env=env, log_path=cluster.log_path(99)))
        client = EmbedClient(settings=settings)
        client.embed(["warm up"], timeout=300)
        for _ in range(args.workers * 2):  # let every child run once, so no cold start is measured
            client.embed(["warm up every child"], timeout=60)
        idle = timed_requests(client, args.requests, jitter_s=0.0)

        load = BulkLoad(settings, args.bulk_chunk_rows, backlog=args.workers * 2)
        load.thread.start()
        deadline = time.monotonic() + 120
        while len(load.chunk_ms()) < args.workers and time.monotonic() < deadline:
            time.sleep(0.2)  # a benchmark: wait until bulk chunks are flowing before timing anything
        busy = timed_requests(client, args.requests, jitter_s=0.5)
        load.stop.set()
        load.thread.join()
        chunk_ms = load.chunk_ms()
        load.cleanup()

    print(
        f"workers: {args.workers} pool children + {args.reserved} interactive-only, "
        f"bulk chunks of {args.bulk_chunk_rows} docs "
        f"(mean {statistics.mean(chunk_ms):.0f} ms each, {len(chunk_ms)} run during the busy phase)"
    )
    print(
        f"idle: p50 {percentile(idle, 0.5) * 1000:.0f} ms, p95 {percentile(idle, 0.95) * 1000:.0f} ms "
        f"over {len(idle)} requests"
    )
    print(
        f"busy: p50 {percentile(busy, 0.5) * 1000:.0f} ms, p95 {percentile(busy, 0.95) * 1000:.0f} ms "
        f"over {len(busy)} requests"
    )
    ok = percentile(busy, 0.95) <= 1.5 and percentile(idle, 0.5) <= 0.6
    print("targets (busy p95 <= 1.5 s, idle p50 <= 0.6 s):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
