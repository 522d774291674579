"""embedq's own Prometheus metrics, read from Redis at scrape time (Flower serves Celery's).

Workers add to one counters hash (`Keys.stats()`: docs, tokens, padded tokens, batches, encode
milliseconds, failures, model loads) as they finish chunks; clients add cache hits and misses.
Reading it at scrape time means any gateway reports the whole fleet, and nothing is lost when a
gateway restarts. Rates (docs/s, tokens/s) are Prometheus' job: `rate(embedq_docs_total[1m])`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workers.protocol.deadlines import expired_counts
from workers.protocol.events import MODEL_COUNTERS, RESEND_REASONS
from workers.protocol.keys import Keys
from workers.protocol.liveness import live_workers
from workers.protocol.model_info import DEFAULT_MODEL_NAME
from workers.protocol.queues import queue_depth
from workers.protocol.routing import LANES, queue_name

#: stats field -> (metric name, help, scale)
_COUNTERS = {
    "docs": ("embedq_docs", "Documents embedded", 1.0),
    "tokens": ("embedq_tokens", "Real (unpadded) tokens embedded", 1.0),
    "padded_tokens": ("embedq_padded_tokens", "Tokens run through the model, padding included", 1.0),
    "batches": ("embedq_batches", "Forward batches run", 1.0),
    "chunks_done": ("embedq_chunks_done", "Chunks embedded and stored", 1.0),
    "chunks_failed": ("embedq_chunks_failed", "Chunks that failed for good", 1.0),
    "chunks_quarantined": ("embedq_chunks_quarantined", "Chunks quarantined after killing their worker", 1.0),
    "copies_dropped": (
        "embedq_chunk_copies_dropped",
        "Late or duplicate chunk copies dropped unstored (first result wins)",
        1.0,
    ),
    "encode_ms": ("embedq_encode_seconds", "Time spent encoding chunks", 0.001),
    "cache_hits": ("embedq_cache_hits", "Texts served from the embeddings cache", 1.0),
    "cache_misses": ("embedq_cache_misses", "Texts looked up in the cache and not found", 1.0),
    "model_loads": ("embedq_model_loads", "Models loaded by pool children", 1.0),
    "model_load_ms": ("embedq_model_load_seconds", "Time pool children spent loading models", 0.001),
}


#: Per-model counter -> (metric name, help); labelled `model` (events.MODEL_COUNTERS).
_MODEL_COUNTERS = {
    "docs": ("embedq_model_docs", "Documents embedded, by model"),
    "tokens": ("embedq_model_tokens", "Real tokens embedded, by model"),
    "chunks_done": ("embedq_model_chunks_done", "Chunks embedded and stored, by model"),
    "chunks_failed": ("embedq_model_chunks_failed", "Chunks that failed for good, by model"),
    "requests": ("embedq_model_requests", "Interactive requests (clients and gateway), by model"),
}
assert set(_MODEL_COUNTERS) == set(MODEL_COUNTERS)


def read_model_stats(client: redis.Redis, keys: Keys) -> dict[str, dict[str, int]]:
    """Per-model counters: counter -> model -> count."""
    raw = cast(dict[bytes, bytes], client.hgetall(keys.model_stats()))
    found: dict[str, dict[str, int]] = {}
    for field, value in raw.items():
        name, _, model = field.decode().partition(":")
        found.setdefault(name, {})[model] = int(value)
    return found


def fleet_models(client: redis.Redis, keys: Keys, records: list[dict[str, object]]) -> list[str]:
    """Every model announced by a worker or served by a live one (the default always): whose queues to measure."""
    announced = {name.decode() for name in cast(list[bytes], client.hkeys(keys.models()))}
    return sorted({DEFAULT_MODEL_NAME, *announced, *(str(r.get("model")) for r in records if r.get("model"))})


def read_stats(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """The fleet counters hash, decoded."""
    raw = cast(dict[bytes, bytes], client.hgetall(keys.stats()))
    return {k.decode(): int(v) for k, v in raw.items()}


class FleetCollector(Collector):
    """Collects embedq's fleet counters and queue depths from Redis on each scrape."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def collect(self) -> Iterator[Metric]:
        try:
            stats = read_stats(self.client, self.keys)
            by_model = read_model_stats(self.client, self.keys)
            records = live_workers(self.client, self.keys)
            depths = {
                (lane, model): queue_depth(self.client, self.keys, queue_name(lane, model))
                for model in fleet_models(self.client, self.keys, records)
                for lane in LANES
            }
            alive = float(len(records))
            up = 1.0
        except (redis.exceptions.RedisError, OSError):
            stats, by_model, depths, up, alive = {}, {}, {}, 0.0, 0.0
        yield GaugeMetricFamily("embedq_broker_up", "1 when the broker answered this scrape", value=up)
        yield GaugeMetricFamily(
            "embedq_workers_alive",
            "Worker main processes whose liveness key has not expired (a lost host drops out within the lease TTL)",
            value=alive,
        )
        resent = CounterMetricFamily(
            "embedq_chunks_resent", "Chunk copies the producers sent again, by reason", labels=["reason"]
        )
        for reason in RESEND_REASONS:
            resent.add_metric([reason], float(stats.get(f"resent_{reason}", 0)))
        yield resent
        expired = CounterMetricFamily(
            "embedq_chunks_expired",
            "Chunks dropped unrun because their request's deadline had passed when a worker picked them up",
            labels=["model", "lane"],
        )
        for model, lane, count in expired_counts(stats):
            expired.add_metric([model, lane], float(count))
        yield expired
        for field, (name, help_text, scale) in _COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=stats.get(field, 0) * scale)
        padded = stats.get("padded_tokens", 0)
        yield GaugeMetricFamily(
            "embedq_padding_ratio",
            "Share of model tokens that were padding (0 is perfect packing)",
            value=1.0 - stats.get("tokens", 0) / padded if padded else 0.0,
        )
        batches = stats.get("batches", 0)
        yield GaugeMetricFamily(
            "embedq_batch_rows_mean",
            "Mean documents per forward batch",
            value=stats.get("docs", 0) / batches if batches else 0.0,
        )
        looked_up = stats.get("cache_hits", 0) + stats.get("cache_misses", 0)
        yield GaugeMetricFamily(
            "embedq_cache_hit_ratio",
            "Cache hits over lookups, since the counters began",
            value=stats.get("cache_hits", 0) / looked_up if looked_up else 0.0,
        )
        loads = stats.get("model_loads", 0)
        yield GaugeMetricFamily(
            "embedq_model_load_seconds_mean",
            "Mean seconds a pool child took to load its model",
            value=stats.get("model_load_ms", 0) / 1000.0 / loads if loads else 0.0,
        )
        for counter, (name, help_text) in _MODEL_COUNTERS.items():
            family = CounterMetricFamily(name, help_text, labels=["model"])
            for model, count in sorted(by_model.get(counter, {}).items()):
                family.add_metric([model], float(count))
            yield family
        lanes = GaugeMetricFamily(
            "embedq_queue_depth",
            "Messages waiting per lane and model (each model has its own queues)",
            labels=["lane", "model"],
        )
        for (lane, model), depth in depths.items():
            lanes.add_metric([lane, model], float(depth))
        yield lanes


def fleet_registry(client: redis.Redis, keys: Keys) -> CollectorRegistry:
    """A registry holding only the fleet collector (the gateway adds its own request metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(client, keys))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of `registry`."""
    return generate_latest(registry)
