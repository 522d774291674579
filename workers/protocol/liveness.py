"""Which worker main processes are alive, as producers and /metrics see it: one TTL key per worker.

Celery's own `worker-heartbeat` events are PUB/SUB, seen only by a subscriber that is listening at the
time, and a lost host never sends `worker-offline`. A key per worker (`Keys.worker(hostname)`) that
its main process renews every `ttl_s / 5` and Redis expires by its own clock answers "how many workers
are alive right now" for any reader, at any time, with no clock skew between hosts.

Readers find the keys through the `Keys.fleet()` set of hostnames (one script: the members' records,
dropping members whose key expired), never by SCAN: the clients and the gateway ask which models are
served on a request's path, and a SCAN walks the whole keyspace (every cached embedding too).
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
import redis.asyncio as aredis

from workers.protocol.keys import Keys

log = logging.getLogger(__name__)


class WorkerBeacon:
    """A daemon thread that keeps this worker's key alive until `stop()`."""

    def __init__(self, client: redis.Redis, keys: Keys, hostname: str, info: dict[str, Any], ttl_s: float) -> None:
        self.client = client
        self.hostname = hostname
        self.fleet = keys.fleet()
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
                # One transaction: a reader never sees the member without its key (it would drop the member).
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.set(self.key, json.dumps(self.record), px=self.ttl_ms)
                    pipe.sadd(self.fleet, self.hostname)
                    pipe.execute()
            except (redis.exceptions.RedisError, OSError) as error:
                log.debug("worker beacon: %s", error)  # the link is down: the key expires, as it should
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        """A clean stop says goodbye at once instead of letting the key expire."""
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)
        with contextlib.suppress(redis.exceptions.RedisError, OSError), self.client.pipeline() as pipe:
            pipe.delete(self.key)
            pipe.srem(self.fleet, self.hostname)
            pipe.execute()


#: KEYS[1] the fleet set, ARGV[1] the prefix of worker keys: the live records, forgetting expired members
#: atomically (a worker that comes back adds itself again with its next renewal).
_LIVE_RECORDS = """
local found = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local record = redis.call('GET', ARGV[1] .. name)
  if record then
    found[#found + 1] = record
  else
    redis.call('SREM', KEYS[1], name)
  end
end
return found
"""


def _decode(raw: list[bytes]) -> list[dict[str, Any]]:
    found = []
    for item in raw:
        with contextlib.suppress(ValueError):
            found.append(json.loads(item))
    return found


def live_workers(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """The records of every worker whose key has not expired."""
    raw = client.eval(_LIVE_RECORDS, 1, keys.fleet(), keys.worker(""))
    return _decode(cast("list[bytes]", raw))


async def live_workers_async(client: aredis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """`live_workers` on redis.asyncio, for the asyncio client and the gateway."""
    raw = await client.eval(_LIVE_RECORDS, 1, keys.fleet(), keys.worker(""))  # type: ignore[misc]
    return _decode(cast("list[bytes]", raw))
