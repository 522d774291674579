"""Which worker main processes are alive, as producers and /metrics see it: one TTL key per worker.

Celery's own `worker-heartbeat` events are PUB/SUB, seen only by a subscriber that is listening at the
time, and a lost host never sends `worker-offline`. A key per worker (`Keys.worker(hostname)`) that
its main process renews every `ttl_s / 5` and Redis expires by its own clock answers "how many workers
are alive right now" for any reader, at any time, with no clock skew between hosts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import Any, cast

import redis

from workers.protocol.keys import Keys

log = logging.getLogger(__name__)


class WorkerBeacon:
    """A daemon thread that keeps this worker's key alive until `stop()`."""

    def __init__(self, client: redis.Redis, keys: Keys, hostname: str, info: dict[str, Any], ttl_s: float) -> None:
        self.client = client
        self.key = keys.worker(hostname)
        self.ttl_ms = int(ttl_s * 1000)
        self.interval_s = ttl_s / 5
        self.record = {"hostname": hostname, "host": socket.gethostname(), "pid": os.getpid(), **info}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="embedq-beacon", daemon=True)

    def start(self) -> WorkerBeacon:
        self._thread.start()
        return self

    def _loop(self) -> None:
        self.record["started"] = time.time()
        while True:
            try:
                self.client.set(self.key, json.dumps(self.record), px=self.ttl_ms)
            except (redis.exceptions.RedisError, OSError) as error:
                log.debug("worker beacon: %s", error)  # the link is down: the key expires, as it should
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        """A clean stop says goodbye at once instead of letting the key expire."""
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            self.client.delete(self.key)


def live_workers(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """The records of every worker whose key has not expired."""
    names = list(cast("list[bytes]", client.scan_iter(match=keys.workers(), count=1000)))
    if not names:
        return []
    found = []
    for raw in cast("list[bytes | None]", client.mget(names)):
        if raw is not None:
            with contextlib.suppress(ValueError):
                found.append(json.loads(raw))
    return found
