"""An optional cache of embeddings in Redis: a sentence asked for twice is embedded once.

Entries are keyed by (model, options, sha256(text)), so a change of model, pooling, length limit,
normalisation, prompt or dimensions never returns a stale vector. Values are raw little-endian float32 bytes with a TTL.
Hits and misses are counted per client (`stats`) and fleet-wide in the `Keys.stats()` hash, which
`/metrics` reports as a hit rate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.protocol.keys import Keys

DEFAULT_TTL_S = 24 * 3600


@dataclass
class CacheStats:
    """What the cache saved this client."""

    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else 0.0


class EmbeddingCache:
    """Key naming and value encoding; the client does the I/O so that sync and async share one cache."""

    def __init__(self, keys: Keys, model: str, options: dict[str, Any], ttl_s: int = DEFAULT_TTL_S) -> None:
        self.keys = keys
        self.ttl_s = ttl_s
        self.stats = CacheStats()
        self._model = model
        self._options = options
        self._namespaces: dict[str, str] = {}
        self._namespace = self.namespace()

    def namespace(self, extra: Mapping[str, Any] | None = None) -> str:
        """One short digest of model and options (with a request's own, such as prompt, dimensions and long), so
        that each text key stays short."""
        options = {**self._options, **(extra or {})}
        identity = json.dumps({"model": self._model, "options": options}, sort_keys=True, separators=(",", ":"))
        found = self._namespaces.get(identity)
        if found is None:
            if len(self._namespaces) > 1024:  # prompts are few, but a client may send arbitrary ones
                self._namespaces.clear()
            found = self._namespaces[identity] = hashlib.sha256(identity.encode()).hexdigest()[:16]
        return found

    def key(self, text: str, extra: Mapping[str, Any] | None = None) -> str:
        return self.keys_for([text], extra)[0]

    def keys_for(self, texts: Sequence[str], extra: Mapping[str, Any] | None = None) -> list[str]:
        namespace = self.namespace(extra) if extra else self._namespace
        return [
            self.keys.cache(namespace, hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest()) for t in texts
        ]

    def decode(self, values: Sequence[bytes | None]) -> list[np.ndarray | None]:
        """MGET replies -> one vector (or None for a miss) per text; counts the hits and misses."""
        vectors = [None if value is None else np.frombuffer(value, dtype="<f4") for value in values]
        hits = sum(1 for v in vectors if v is not None)
        self.stats.hits += hits
        self.stats.misses += len(vectors) - hits
        return vectors

    @staticmethod
    def encode(vector: np.ndarray) -> bytes:
        return np.ascontiguousarray(vector, dtype="<f4").tobytes()

    def stat_changes(self, hits: int, misses: int) -> dict[str, int]:
        """Fleet counters to add to `Keys.stats()` for one lookup."""
        return {"cache_hits": hits, "cache_misses": misses}
