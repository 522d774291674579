"""Settings for workers and producers: read once from EMBEDQ_* variables, validated, frozen.

`celery_config(settings)` is the only place where Celery setting names appear.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workers.protocol.errors import ConfigError
from workers.protocol.queues import QUEUES
from workers.protocol.routing import worker_queues

__all__ = ["DTYPES", "POOLINGS", "QUEUES", "TASK_EMBED_CHUNK", "Settings", "celery_config"]

PREFIX = "EMBEDQ_"
DTYPES = ("auto", "fp32", "bf16", "fp16")
#: Inference runtimes (workers/encoder/backend.py); auto = the fastest one that is exact enough on CPU, torch on CUDA.
RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
POOLINGS = ("auto", "cls", "mean", "max")
TASK_EMBED_CHUNK = "embedq.embed_chunk"
TASK_PING = "embedq.ping"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
#: A chunk's lease is renewed this many times per lease lifetime (workers/lease.py): four may be missed
#: before it expires, and the producer tells a running copy from a dead one by its renewals.
LEASE_RENEWALS_PER_TTL = 5


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


def _optional_int(raw: str) -> int | None:
    return None if raw.strip() in ("", "auto") else int(raw)


@dataclass(frozen=True)
class Settings:
    """Everything a worker or producer process needs to know, in one immutable value."""

    broker_url: str = DEFAULT_BROKER_URL
    #: Where Redis results live; empty means the broker's Redis.
    result_url: str = ""
    key_prefix: str = "embedq"
    #: Local folder or hub name; empty means the packaged all-MiniLM-L6-v2.
    model: str = ""
    device: str = "auto"
    dtype: str = "fp32"
    #: Which runtime runs the forward pass: auto, torch, openvino or onnxruntime.
    runtime: str = "auto"
    #: Where models converted for OpenVINO / ONNX Runtime are kept; empty means $XDG_CACHE_HOME/embedq.
    cache_dir: str = ""
    batch_tokens: int = 2048
    #: Pool children per worker; None lets embedq pick from the cores.
    concurrency: int | None = None
    #: torch intra-op threads per child; None means cores // concurrency.
    torch_threads: int | None = None
    pool: str = "prefork"
    pool_start_method: str = "fork"
    #: How long a new pool child may take to load its model before Celery kills it.
    proc_alive_timeout_s: float = 120.0
    #: Redis redelivers a message not acked within this time; it bounds every time limit below.
    visibility_timeout_s: float = 3600.0
    task_time_limit_s: float = 1800.0
    task_soft_time_limit_s: float = 1740.0
    #: A running chunk's lease lives this long unless its pool child renews it (every fifth of it): a
    #: silent holder (host lost, partitioned, frozen) has its chunk sent again about this long after.
    lease_ttl_s: float = 10.0
    #: Socket timeout and health-check interval of every Redis connection of a worker: a worker whose
    #: link is cut notices within about this long instead of the kernel's ~15 minutes.
    broker_timeout_s: float = 5.0
    #: A chunk whose worker died this many times is quarantined instead of retried again.
    max_deliveries: int = 3
    result_ttl_s: int = 24 * 3600
    #: Skip the memory check before loading a model (for machines whose limits are misreported).
    skip_memory_check: bool = False
    #: Celery replaces a prefork child whose peak RSS passed this many MB, once its chunk is done; None or 0 =
    #: never. A safety net, far above the ~1 GB plateau of all-MiniLM-L6-v2 (README Performance): the new child
    #: reloads the model, so raise it for a larger model.
    max_child_memory_mb: int | None = 4096
    #: The only folder under which this worker writes `disk:PATH` results; empty refuses disk results, so that
    #: a task message (anyone who can reach the broker) cannot choose where a worker writes files.
    disk_results_root: str = ""
    #: Bearer token the HTTP gateway (`embedq serve`) requires; empty means no key. Never shown in repr.
    api_key: str = field(default="", repr=False)
    #: Filled in by the worker main process so that pool children know their share of the cores.
    pool_concurrency: int | None = field(default=None, repr=False)

    @property
    def results_url(self) -> str:
        return self.result_url or self.broker_url

    def validate(self) -> Settings:
        if not self.broker_url.startswith(("redis://", "rediss://", "unix://", "redis+socket://")):
            raise ConfigError(f"EMBEDQ_BROKER_URL={self.broker_url!r}: use redis://, rediss:// or unix://")
        if self.dtype not in DTYPES:
            raise ConfigError(f"EMBEDQ_DTYPE={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"EMBEDQ_DEVICE={self.device!r}: choose auto, cpu, cuda or cuda:N")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"EMBEDQ_RUNTIME={self.runtime!r}: choose one of {', '.join(RUNTIMES)}")
        if self.runtime not in ("auto", "torch") and self.device.startswith("cuda"):
            raise ConfigError(
                f"EMBEDQ_RUNTIME={self.runtime} runs on CPU only, but EMBEDQ_DEVICE={self.device}: "
                "use EMBEDQ_RUNTIME=torch or auto on CUDA"
            )
        if self.batch_tokens < 16:
            raise ConfigError(f"EMBEDQ_BATCH_TOKENS={self.batch_tokens}: must be at least 16")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"EMBEDQ_CONCURRENCY={self.concurrency}: must be at least 1")
        if self.pool not in ("prefork", "solo", "threads"):
            raise ConfigError(f"EMBEDQ_POOL={self.pool!r}: choose prefork, solo or threads")
        if self.pool_start_method not in ("fork", "spawn"):
            raise ConfigError(f"EMBEDQ_POOL_START_METHOD={self.pool_start_method!r}: choose fork or spawn")
        if not 0 < self.task_soft_time_limit_s < self.task_time_limit_s < self.visibility_timeout_s:
            raise ConfigError(
                "time limits must satisfy 0 < soft limit < hard limit < visibility timeout, got "
                f"{self.task_soft_time_limit_s} < {self.task_time_limit_s} < {self.visibility_timeout_s}: "
                "a task running past the visibility timeout is delivered twice while it still runs"
            )
        if self.max_child_memory_mb is not None and self.max_child_memory_mb < 0:
            raise ConfigError(f"EMBEDQ_MAX_CHILD_MEMORY_MB={self.max_child_memory_mb}: must be 0 (off) or a size in MB")
        if self.lease_ttl_s < 1.0:
            raise ConfigError(f"EMBEDQ_LEASE_TTL_S={self.lease_ttl_s:g}: must be at least 1 s")
        if self.broker_timeout_s < 1.0:
            raise ConfigError(f"EMBEDQ_BROKER_TIMEOUT_S={self.broker_timeout_s:g}: must be at least 1 s")
        if self.max_deliveries < 1:
            raise ConfigError(f"EMBEDQ_MAX_DELIVERIES={self.max_deliveries}: must be at least 1")
        if not self.key_prefix or ":" in self.key_prefix:
            raise ConfigError(f"EMBEDQ_KEY_PREFIX={self.key_prefix!r}: must be non-empty and contain no ':'")
        return self

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes).validate()

    def to_env(self) -> dict[str, str]:
        """The EMBEDQ_* variables that rebuild these settings in another process."""
        env: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            env[PREFIX + f.name.upper()] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read EMBEDQ_* variables; an unknown EMBEDQ_* name is an error (it is usually a typo)."""
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in environ.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX) :].lower()
            if name not in fields:
                known = ", ".join(PREFIX + n.upper() for n in fields)
                raise ConfigError(f"unknown setting {key}; known settings: {known}")
            try:
                values[name] = _parse(fields[name], raw)
            except ValueError as error:
                raise ConfigError(f"{key}={raw!r}: {error}") from None
        return cls(**values).validate()


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = str(f.type)
    if kind == "bool":
        return _bool(raw)
    if kind == "int | None":
        return _optional_int(raw)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return raw


def _restore_sweep(visibility_timeout_s: float) -> dict[str, int]:
    """kombu's unacked_restore_interval/throttle for a sweep about every tenth of the visibility timeout."""
    sweep_s = min(100, max(1, int(visibility_timeout_s // 10)))
    interval_s = min(10, sweep_s)
    return {"unacked_restore_interval": interval_s, "unacked_restore_throttle": max(1, sweep_s // interval_s)}


def keepalive_options(timeout_s: float) -> dict[int, int]:
    """TCP keepalive probes that declare a silent peer dead after about `timeout_s` (Linux names)."""
    import socket

    idle_s = max(1, int(timeout_s / 2))
    options = {}
    probes = max(1, int(timeout_s) - idle_s)
    for name, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", probes)):
        if hasattr(socket, name):
            options[getattr(socket, name)] = value
    return options


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for embedq; see ARCHITECTURE.md for why each delivery setting is what it is."""
    # Imported here, not at the top: Settings alone (the CLI before it starts any process) need no kombu.
    from kombu import Exchange, Queue

    # The queues of the model these settings name (workers/protocol/routing.py): a worker started without -Q
    # consumes exactly these, so it only ever receives chunks for its own model.
    queues = worker_queues(settings.model)
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # kombu sweeps unacked messages of dead workers back to their queue every interval x throttle
            # seconds (100 s by default); tie the sweep to the visibility timeout so that it stays small
            # next to it, whatever the timeout is.
            **_restore_sweep(settings.visibility_timeout_s),
            # Redis has no heartbeats: without these a worker on a cut link waits on a dead socket for the
            # kernel's ~15 minutes. kombu >= 5.7 also drops a BRPOP whose reply is overdue by this long.
            "socket_timeout": settings.broker_timeout_s * 2,
            "socket_connect_timeout": settings.broker_timeout_s,
            "socket_keepalive": True,
            "socket_keepalive_options": keepalive_options(settings.broker_timeout_s),
            "health_check_interval": max(1, int(settings.broker_timeout_s)),
            "retry_on_timeout": False,
            # Poll queues in the order given, so that `interactive` always goes before `bulk`.
            "queue_order_strategy": "priority",
            # Celery's own keys (queues, unacked) share embedq's prefix: tenants and tests never collide.
            "global_keyprefix": f"{settings.key_prefix}:",
        },
        # Arrays never travel through Celery's result backend; tasks return metadata that Flower
        # sees in its events, and completions reach the producer through embedq's own keys.
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": queues[-1],
        # Declared in priority order: a worker polls `interactive` before `bulk`.
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in queues],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # A host healed after a partition must come back by itself, however long the cut lasted.
        "broker_connection_max_retries": None,
        "worker_proc_alive_timeout": settings.proc_alive_timeout_s,
        "worker_pool_start_method": settings.pool_start_method,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_max_tasks_per_child": None,
        # Celery counts KiB; 0/None turns the check off.
        "worker_max_memory_per_child": (settings.max_child_memory_mb or 0) * 1024 or None,
        "worker_enable_remote_control": True,
    }
