"""Redis key names shared by workers and producers, and one way to connect with a clear error."""

from __future__ import annotations

from typing import Any

import redis

from workers.protocol.errors import BrokerUnavailable

#: The `state` field of a job record (`Keys.job`): written by the producer (producer/job/record.py), read by
#: workers, which drop any copy of a chunk whose job has ENDED (workers/tasks.py `settled`).
JOB_RUNNING, JOB_DONE, JOB_FAILED = "running", "done", "failed"
JOB_ENDED = (JOB_DONE, JOB_FAILED)


class Keys:
    """Every Redis key embedq writes, under one prefix so that tests and tenants never collide."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def result(self, job: str, chunk: int) -> str:
        """Hash of one chunk's float32 rows (rows, dim, data), with a TTL."""
        return f"{self.prefix}:result:{job}:{chunk}"

    def events(self, job: str) -> str:
        """List of JSON completion events (done, failed) that the producer pops."""
        return f"{self.prefix}:events:{job}"

    def deliveries(self, job: str) -> str:
        """Hash chunk -> times a worker started it; caps redelivery after crashes."""
        return f"{self.prefix}:deliveries:{job}"

    def job(self, job: str) -> str:
        """Hash of a job's progress, for `embedq status`."""
        return f"{self.prefix}:job:{job}"

    def jobs(self) -> str:
        """Sorted set of job ids by start time."""
        return f"{self.prefix}:jobs"

    def stats(self) -> str:
        """Hash of worker counters (docs, tokens, ...) for metrics."""
        return f"{self.prefix}:stats"

    def lease(self, job: str, chunk: int, attempt: int) -> str:
        """String with a short TTL: the pool child running this copy of a chunk is alive (workers/lease.py)."""
        return f"{self.prefix}:lease:{job}:{chunk}:{attempt}"

    def leases(self, job: str) -> str:
        """SCAN pattern of every lease of `job`."""
        return f"{self.prefix}:lease:{job}:*"

    def collected(self, job: str) -> str:
        """Set of chunk numbers the producer has written: a copy finishing later is dropped (first result wins)."""
        return f"{self.prefix}:collected:{job}"

    def sends(self, job: str) -> str:
        """Hash chunk -> times the producer sent it (first send, re-sends and backups), for `embedq status`."""
        return f"{self.prefix}:sends:{job}"

    def worker(self, hostname: str) -> str:
        """String with a short TTL, renewed by each live worker main process (workers/protocol/liveness.py)."""
        return f"{self.prefix}:worker:{hostname}"

    def workers(self) -> str:
        """SCAN pattern of every live worker's key."""
        return f"{self.prefix}:worker:*"

    def fleet(self) -> str:
        """Set of the hostnames whose worker keys may be alive: readers look up only these, never SCAN."""
        return f"{self.prefix}:fleet"

    def model_stats(self) -> str:
        """Hash `counter:model` -> count (docs, chunks, requests per model), for /metrics."""
        return f"{self.prefix}:stats:models"

    def models(self) -> str:
        """Hash model name -> JSON of the model a worker serves (pooling, length, dim), for light producers."""
        return f"{self.prefix}:models"

    def cache(self, namespace: str, digest: str) -> str:
        """One cached embedding: `namespace` names model and options, `digest` the text."""
        return f"{self.prefix}:cache:{namespace}:{digest}"

    def queue(self, name: str) -> str:
        """A list kombu keeps a queue's messages in (Celery's keys share the prefix: `global_keyprefix`)."""
        return f"{self.prefix}:{name}"

    def unacked(self) -> str:
        """kombu's hash of messages delivered but not yet acknowledged."""
        return f"{self.prefix}:unacked"


def redact(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ':'}***@{host}"


def connect(url: str, *, check: bool = True, **options: Any) -> redis.Redis:
    """A Redis client for `url` (redis://, rediss:// with TLS, unix://, passwords and ACL users)."""
    options = {"health_check_interval": 30, "socket_connect_timeout": 5, **options}
    client = redis.Redis.from_url(url, **options)
    if check:
        try:
            client.ping()
        except redis.exceptions.AuthenticationError as error:
            raise BrokerUnavailable(f"Redis at {redact(url)} refused the credentials: {error}") from error
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as error:
            raise BrokerUnavailable(
                f"cannot reach Redis at {redact(url)} ({error}); start it or pass another --broker"
            ) from error
    return client
