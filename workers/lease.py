"""Per-chunk leases: how the fleet tells, within seconds, that the pool child running a chunk is alive.

A child starting a chunk writes `Keys.lease(job, chunk, attempt)` with a TTL of `lease_ttl_s` and a
thread of its own renews it every fifth of that. The producer watches the leases of the chunks it is
waiting for (producer/job/dispatcher.py): a lease that vanishes without a done event means its holder went
silent (host lost, link cut, VM frozen), and the chunk is sent again. The renewal thread only needs
the GIL for a few microseconds every couple of seconds, and torch, the tokenizers and the compiled
runtimes release the GIL while they compute, so a busy child still renews (`max_gap_ms` in the lease
records how late a renewal ever was, for the benchmark that measures it under a loaded CPU).

A child that cannot renew its lease (its link is cut, or it was frozen past the TTL) has lost the
chunk: another copy is on its way, so this one is dropped instead of stored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from types import TracebackType
from typing import Any

import redis

from workers.protocol.config import LEASE_RENEWALS_PER_TTL
from workers.protocol.keys import Keys

log = logging.getLogger(__name__)
HOST = socket.gethostname()


class ChunkLease:
    """The lease of one running copy of a chunk; use as a context manager around the work."""

    def __init__(
        self, client: redis.Redis, keys: Keys, job: str, chunk: int, attempt: int, *, ttl_s: float, worker: str = ""
    ) -> None:
        self.client = client
        self.key = keys.lease(job, chunk, attempt)
        self.ttl_ms = int(ttl_s * 1000)
        self.interval_s = ttl_s / LEASE_RENEWALS_PER_TTL
        self.record: dict[str, Any] = {
            "host": HOST,
            "worker": worker,
            "pid": os.getpid(),
            "attempt": attempt,
            "started": time.time(),
            "renewals": 0,
            "max_gap_ms": 0,
        }
        #: Set once a renewal found the lease gone or could not reach Redis for a whole TTL.
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_renewed = time.monotonic()

    def __enter__(self) -> ChunkLease:
        self.client.set(self.key, json.dumps(self.record), px=self.ttl_ms)
        self._last_renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.key}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s * 2)
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            self.client.delete(self.key)  # else it expires by itself

    def _renew_loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            gap_ms = int((now - last - self.interval_s) * 1000)
            last = now
            self.record["renewals"] = int(self.record["renewals"]) + 1
            self.record["max_gap_ms"] = max(int(self.record["max_gap_ms"]), gap_ms)
            try:
                # XX: only while it still exists. An expired lease means the producer may already have
                # sent the chunk again; recreating it would hide that from anyone who looks.
                renewed = self.client.set(self.key, json.dumps(self.record), px=self.ttl_ms, xx=True)
            except (redis.exceptions.RedisError, OSError) as error:
                if now - self._last_renewed >= self.ttl_ms / 1000:
                    self._lose(f"could not renew it for {now - self._last_renewed:.1f} s ({error})")
                    return
                continue
            if not renewed:
                self._lose("it expired before this child could renew it (frozen, or cut off from Redis)")
                return
            self._last_renewed = now

    def _lose(self, why: str) -> None:
        log.warning("lease %s lost: %s; this copy of the chunk will be dropped", self.key, why)
        self.lost.set()
