"""The embedded default: a private Valkey server and local Celery workers, stopped whatever happens.

`embedq embed` without --broker runs inside `LocalCluster`; so does `embedq up`. Every process it
starts gets PR_SET_PDEATHSIG, so even a SIGKILLed producer leaves no orphan behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from producer.local.embedded_redis import EmbeddedRedis
from producer.local.processes import start_process, stop_process, stop_processes
from workers.protocol.config import Settings
from workers.protocol.errors import WorkersFailed

__all__ = ["LocalCluster", "WorkersFailed", "start_process", "stop_process", "worker_command"]


def worker_command(
    concurrency: int | None,
    pool: str = "prefork",
    hostname: str = "embedq-local@%h",
    loglevel: str = "WARNING",
    *,
    app: str = "workers.app",
    queues: list[str] | None = None,
) -> list[str]:
    """`celery -A APP worker`; without `queues`, on the queues of the model in its EMBEDQ_MODEL, in priority order.

    The worker's own app declares its model's queues (workers/protocol/routing.py), so a worker started
    for any model consumes the right ones without being told; `queues` narrows them (a reserved lane).
    """
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "--pool",
        pool,
        *(["-Q", ",".join(queues)] if queues else []),
        "-n",
        hostname,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    if concurrency:
        args += ["--concurrency", str(concurrency)]
    return args


class LocalCluster:
    """Valkey + N worker processes in a private temp folder; a context manager that always cleans up."""

    def __init__(
        self,
        settings: Settings,
        *,
        workers: int = 1,
        concurrency: int | None = None,
        pool: str = "prefork",
        keep_logs_on_error: bool = True,
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.concurrency = concurrency
        self.pool = pool
        self.keep_logs_on_error = keep_logs_on_error
        self.folder = Path(tempfile.mkdtemp(prefix="embedq-"))
        self.server: EmbeddedRedis | None = None
        self.processes: list[subprocess.Popen[bytes]] = []
        self.broker_url = ""

    def start(self) -> LocalCluster:
        """Launch Valkey and the workers together, then wait for Valkey only.

        A worker imports for a second or more before it connects; Valkey listens within milliseconds.
        """
        self.server = EmbeddedRedis(self.folder / "valkey").launch()
        self.broker_url = self.server.url
        worker_settings = self.settings.replace(broker_url=self.broker_url, result_url="")
        env = {
            **os.environ,
            **worker_settings.to_env(),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            # What the workers leave in the temp folder (crash-loop markers) goes with this folder, even
            # when they are SIGKILLed (stop(at_once=True)) before they could clean up.
            "TMPDIR": str(self.folder),
        }
        for n in range(self.workers):
            command = worker_command(self.concurrency, self.pool, hostname=f"embedq-local{n}-{os.getpid()}@%h")
            self.processes.append(start_process(command, env=env, log_path=self.log_path(n)))
        self.server.wait_ready()
        return self

    def log_path(self, n: int) -> Path:
        return self.folder / f"worker-{n}.log"

    def check_alive(self) -> None:
        """Raise WorkersFailed with the worker's own last words when every worker has exited."""
        if self.processes and all(p.poll() is not None for p in self.processes):
            raise WorkersFailed(self.last_words())

    def last_words(self) -> str:
        for n in range(len(self.processes)):
            text = self.log_path(n).read_text(encoding="utf-8", errors="replace") if self.log_path(n).exists() else ""
            for line in reversed(text.splitlines()):
                if line.startswith("embedq worker:"):
                    return line[len("embedq worker:") :].strip()
            if text.strip():
                return "local worker exited: " + text.strip().splitlines()[-1]
        return "local workers exited before doing any work"

    def stop(self, *, at_once: bool = False) -> None:
        """Stop the workers, then Valkey, and remove the folder; safe to call again.

        Warm by default: each worker finishes its running tasks (an error or an interrupt may leave some).
        `at_once` SIGKILLs workers and Valkey together: for a finished job, whose workers have nothing left
        worth finishing and whose private Valkey holds nothing worth saving (a warm stop costs ~1 s).
        """
        server = [self.server.process] if self.server is not None and self.server.process is not None else []
        if at_once:
            stop_processes([*self.processes, *server], at_once=True)
        else:
            stop_processes(self.processes)  # before Valkey: a warm shutdown still talks to the broker
        self.processes.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
