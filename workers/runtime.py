"""The per-process worker context: settings, the loaded encoder and the stores.

Built once per pool child in `worker_process_init` (prefork, fork or spawn; solo), or once in the
main process for the threads pool. Tasks reach it through `current()`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from workers.protocol import model_registry
from workers.protocol.config import Settings
from workers.protocol.errors import WorkerNotReady
from workers.protocol.keys import Keys, connect
from workers.protocol.model_info import ModelInfo, resolve_model
from workers.protocol.store import ResultStore, open_store

if TYPE_CHECKING:
    from workers.encoder import Encoder

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a task needs, built once per process."""

    settings: Settings
    model: ModelInfo
    encoder: Encoder
    coordination: redis.Redis
    keys: Keys
    load_s: float
    threads: int
    _stores: dict[str, ResultStore] = field(default_factory=dict)
    _stores_lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self, spec: str) -> ResultStore:
        """The result store a task asked for (`redis` or `disk:PATH` under EMBEDQ_DISK_RESULTS_ROOT), opened once.

        A refused path raises ResultsRefused, which fails the chunk once with that reason (never retried).
        """
        with self._stores_lock:
            if spec not in self._stores:
                self._stores[spec] = open_store(
                    spec,
                    redis_url=self.settings.results_url,
                    key_prefix=self.settings.key_prefix,
                    ttl_s=self.settings.result_ttl_s,
                    disk_root=self.settings.disk_results_root,
                )
            return self._stores[spec]


_context: WorkerContext | None = None
_context_lock = threading.Lock()


def threads_per_child(settings: Settings, cores: int | None = None) -> int:
    """torch threads for one child: its share of the cores, so children never oversubscribe them."""
    if settings.torch_threads:
        return settings.torch_threads
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, settings.pool_concurrency or settings.concurrency or 1))


#: glibc mallopt parameter numbers (malloc.h).
_M_MMAP_THRESHOLD = -3
#: Blocks at least this large get their own mmap and go back to the system when freed. Measured on bf16
#: all-MiniLM-L6-v2, 12 chunks of 512 fortunes, one thread: 128 KiB kept RSS flattest but cost 30% of docs/s
#: (page faults on every large tensor), 1 MiB 15%; 4 MiB was 25% faster than glibc's dynamic threshold.
MMAP_THRESHOLD_BYTES = 4 * 2**20
#: Compiled oneDNN kernels kept per process (its default is 1024, one per batch shape and op).
ONEDNN_CACHE_CAPACITY = 16
#: Matmul primitives torch's ideep layer keeps (LRU_CACHE_CAPACITY, default 1024), each holding its own reordered
#: copy of the weights: under bf16 autocast each new batch shape added a few MB, so a child grew by 230-380 MB per
#: 100 chunks until the cache filled. One batch needs only a handful of shapes (the six layers share them), so 16
#: still hits within a batch. Measured side by side in one process, bf16, 150 chunks of 32 fortunes, one thread
#: each: both caches at 16, +0.4 MB per 100 chunks at 176 docs/s; both at 1024, +334 MB at 160 docs/s.
IDEEP_CACHE_CAPACITY = 16


def bound_native_memory() -> None:
    """Keep a long-running child's RSS flat: fix glibc's mmap threshold and bound oneDNN's and ideep's caches.

    glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, after which
    activation tensors come from the heap, which fragments as batch shapes change and never shrinks:
    a bf16 child grew by 1.3 GB over 40 chunks, and `malloc_trim` gave nothing back. A fixed threshold
    keeps large tensors in their own mappings, returned on free. oneDNN and ideep read their cache capacities
    on first use, so setting them here, before any forward pass (even after `import torch`), still counts.
    A value the user set wins for each (MALLOC_MMAP_THRESHOLD_=131072 keeps RSS flatter still, at 30% of the speed).
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(IDEEP_CACHE_CAPACITY))
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return  # glibc read the user's own value at process start
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        log.info("mallopt unavailable: the mmap threshold stays glibc's default")


def worker_socket_options(settings: Settings) -> dict[str, Any]:
    """redis-py options for a worker's own connections: a cut link fails within seconds, not minutes."""
    from workers.protocol.config import keepalive_options

    return {
        "socket_timeout": settings.broker_timeout_s * 2,
        "socket_connect_timeout": settings.broker_timeout_s,
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(settings.broker_timeout_s),
        "health_check_interval": max(1, int(settings.broker_timeout_s)),
    }


def init_process(settings: Settings) -> WorkerContext:
    """Load the model and connect; idempotent within a process."""
    global _context
    with _context_lock:
        if _context is not None:
            return _context
        import time

        # True when the worker main process imported the model code before forking us (workers/app.py).
        inherited = "transformers.models.auto.modeling_auto" in sys.modules
        from workers.encoder import Encoder, configure_threads

        started = time.monotonic()
        bound_native_memory()
        threads = threads_per_child(settings)
        configure_threads(threads)
        model = resolve_model(settings.model)
        # Any runtime's thread pool (OpenMP, TBB, ONNX Runtime's) is created here, in the child, never before fork.
        encoder = Encoder.load(
            model,
            settings.device,
            runtime=settings.runtime,
            dtype=settings.dtype,
            threads=threads,
            cache_dir=settings.cache_dir,
        )
        encoder.warm_up(settings.batch_tokens, settings.dtype)
        load_s = time.monotonic() - started
        coordination = connect(settings.broker_url, **worker_socket_options(settings))
        _context = WorkerContext(settings, model, encoder, coordination, Keys(settings.key_prefix), load_s, threads)
        # For /metrics (embedq_model_load_seconds): how often children load a model and how long it takes;
        # and the model itself, for light producers that cannot read it (workers/protocol/model_registry.py).
        with coordination.pipeline(transaction=False) as pipe:
            pipe.hincrby(_context.keys.stats(), "model_loads", 1)
            pipe.hincrby(_context.keys.stats(), "model_load_ms", int(load_s * 1000))
            model_registry.announce(pipe, _context.keys, model)
            pipe.execute()
        log.warning(
            "embedq child %d ready: %s, runtime %s, %d threads, loaded in %.1f s (%s)",
            os.getpid(),
            model.name,
            encoder.runtime_name,
            threads,
            load_s,
            _imports(inherited),
        )
        return _context


def _imports(inherited: bool) -> str:
    """Where this child's model code came from, for its ready line (tests and operators read it)."""
    if inherited:
        return "imports inherited from the worker process"
    # A child on OpenVINO or ONNX Runtime with its model already converted never imports torch.
    return "imported here" if "torch" in sys.modules else "without torch"


def current() -> WorkerContext:
    """The context of this process; WorkerNotReady if `init_process` never ran here."""
    if _context is None:
        raise WorkerNotReady(f"process {os.getpid()} has no model loaded: worker_process_init did not run here")
    return _context


def reset() -> None:
    """Forget the context (tests only)."""
    global _context
    _context = None
