"""`embedq up`: the whole stack on one machine (Valkey, workers, Flower, gateway) until Ctrl-C.

Every process is started with PR_SET_PDEATHSIG in its own process group (see local_cluster.py), so
Ctrl-C, SIGTERM or even a SIGKILL of `embedq up` leaves nothing running behind it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from producer.local import state as local_state
from producer.local.cluster import worker_command
from producer.local.embedded_redis import EmbeddedRedis, write_private
from producer.local.processes import start_process, stop_process
from workers.protocol.config import Settings
from workers.protocol.errors import WorkersFailed
from workers.protocol.keys import redact
from workers.protocol.queues import INTERACTIVE
from workers.protocol.routing import worker_queues


@dataclass
class Service:
    """One started process and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def last_line(self) -> str:
        text = self.log_path.read_text(errors="replace").strip() if self.log_path.exists() else ""
        return text.splitlines()[-1] if text else "(no output)"


def interactive_worker(settings: Settings, children: int, hostname: str) -> tuple[list[str], dict[str, str]]:
    """A worker that consumes only `interactive`: capacity no bulk chunk can occupy.

    Priority alone makes a request wait for the bulk chunk a child is running (seconds on a busy CPU);
    a reserved child answers at once. It sleeps between requests and uses one torch thread, so it
    costs a model's memory, not cores.
    """
    command = worker_command(
        children, hostname=hostname, loglevel="INFO", queues=worker_queues(settings.model, [INTERACTIVE])
    )
    env = {
        **os.environ,
        **settings.replace(torch_threads=1).to_env(),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    return command, env


def flower_command(host: str, port: int) -> list[str]:
    """Flower on the workers' own app: it sees their queues, events and key prefix."""
    return [sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--address={host}", f"--port={port}"]


def flower_credential(environ: dict[str, str]) -> tuple[str, bool]:
    """Flower's `user:password`: the user's FLOWER_BASIC_AUTH (Flower's own variable), else a new random one.

    Returns it and whether it was generated (then `embedq up` prints it, once). It reaches Flower
    through its environment, never its argv (`ps` shows argv to every local user).
    """
    if environ.get("FLOWER_BASIC_AUTH"):
        return environ["FLOWER_BASIC_AUTH"], False
    return f"embedq:{secrets.token_urlsafe(18)}", True


def gateway_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "producer.cli", "serve", "--host", host, "--port", str(port)]


class Stack:
    """Starts and stops the services of `embedq up`; `stop()` is safe to call at any point."""

    def __init__(
        self,
        settings: Settings,
        *,
        embedded: bool,
        workers: int,
        host: str,
        port: int,
        flower_port: int,
        reserved: int = 1,
        broker_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.broker_port = broker_port
        self.embedded = embedded
        self.workers = workers
        self.reserved = reserved
        self.host = host
        self.port = port
        self.flower_port = flower_port
        self.folder = Path(tempfile.mkdtemp(prefix="embedq-up-"))
        self.server: EmbeddedRedis | None = None
        self.services: list[Service] = []
        #: The 0600 file holding the embedded broker's URL with its password (None with --broker).
        self.url_file: Path | None = None

    def start(self) -> dict[str, str]:
        """Start everything; returns what runs where."""
        broker_url = self.settings.broker_url
        broker_note = ""
        if self.embedded:
            self.server = EmbeddedRedis(self.folder / "valkey", port=self.broker_port).start()
            broker_url = self.server.url
            # The password stays off argv and the terminal: local tools read the URL from a 0600 file.
            url_file = self.url_file = write_private(self.folder / "broker.url", broker_url + "\n")
            broker_note = f" (embedded Valkey, password required; the full URL is in {url_file}, readable by you only)"
        settings = self.settings.replace(broker_url=broker_url)
        env = {**os.environ, **settings.to_env(), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        env.pop("FLOWER_BASIC_AUTH", None)
        flower_auth, generated = flower_credential(dict(os.environ))
        commands = {
            "worker": (worker_command(self.workers, hostname=f"embedq-up-{os.getpid()}@%h", loglevel="INFO"), env),
            "flower": (flower_command(self.host, self.flower_port), {**env, "FLOWER_BASIC_AUTH": flower_auth}),
            "gateway": (gateway_command(self.host, self.port), env),
        }
        for name, (command, service_env) in commands.items():
            log_path = self.folder / f"{name}.log"
            self.services.append(Service(name, start_process(command, env=service_env, log_path=log_path), log_path))
        if self.reserved:
            command, lane_env = interactive_worker(settings, self.reserved, f"embedq-up-interactive-{os.getpid()}@%h")
            log_path = self.folder / "interactive-worker.log"
            self.services.insert(
                0, Service("interactive worker", start_process(command, env=lane_env, log_path=log_path), log_path)
            )
        user, _, password = flower_auth.partition(":")
        shown = f"user {user!r}, password {password!r} (set FLOWER_BASIC_AUTH=user:password to choose)"
        return {
            "broker": redact(broker_url) + broker_note,
            "workers": f"{self.workers} pool children, {self.reserved} reserved for interactive requests "
            f"(logs in {self.folder})",
            "flower": f"http://{self.host}:{self.flower_port}  basic auth: "
            + (shown if generated else f"user {user!r} from FLOWER_BASIC_AUTH"),
            "gateway": f"http://{self.host}:{self.port}  (POST /v1/embeddings, GET /health, GET /metrics)",
        }

    def check_alive(self) -> None:
        """WorkersFailed naming the first service that exited on its own, with its last words."""
        for service in self.services:
            if service.process.poll() is not None:
                raise WorkersFailed(
                    f"{service.name} exited with code {service.process.returncode}: "
                    f"{service.last_line()} (log {service.log_path})"
                )

    def stop(self, *, keep_logs: bool = False) -> None:
        """Stop every service; `keep_logs` leaves the folder that an error message points to."""
        # The gateway and Flower first, so that nothing new reaches workers while they finish.
        for service in reversed(self.services):
            stop_process(service.process, timeout_s=10)
        self.services.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None
        if not keep_logs:
            shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def broker_url(self) -> str:
        return self.server.url if self.server is not None else self.settings.broker_url


def _health(url: str) -> tuple[int, str]:
    """Status and body of GET url; (0, reason) while nothing answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own loopback gateway
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError as error:
        return 0, str(error)


def wait_ready(stack: Stack, health_url: str, say: Callable[[str], None], every_s: float = 15.0) -> None:
    """Block until the gateway's /health is 200 (a broker and a worker answer); WorkersFailed if a service dies."""
    next_note = time.monotonic() + every_s
    while True:
        stack.check_alive()
        status, body = _health(health_url)
        if status == 200:
            return
        if time.monotonic() >= next_note:
            say(f"still starting: {health_url} answers {status or 'nothing'} {body.strip()[:160]}")
            next_note = time.monotonic() + every_s
        time.sleep(0.5)


def run_up(stack: Stack) -> int:
    """Start the stack, say "ready" once the gateway is healthy, and wait for Ctrl-C/SIGTERM (KeyboardInterrupt)."""
    # Ctrl-C must stop the stack even when started from a shell that ignores SIGINT for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    host, port = stack.host, stack.port

    def say(line: str) -> None:
        print(f"embedq up: {line}", flush=True)

    announced = None
    failed = True
    try:
        where = stack.start()
        if stack.embedded:
            announced = local_state.announce("up", stack.broker_url, time.time())
        say(f"starting {where['broker']}, workers, Flower and the gateway; waiting for the gateway's /health")
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        wait_ready(stack, f"http://{local}:{port}/health", say)
        say("ready")
        for name, place in where.items():
            say(f"{name:<8} {place}")
        # Lines to copy, with no password in them: the URL comes from its 0600 file, and a bare `embedq
        # status` finds this stack by itself (producer/local/state.py).
        url = f"open({str(stack.url_file)!r}).read().strip()" if stack.url_file else repr(redact(stack.broker_url))
        say(f"python   EmbedClient({url})  # from producer.serve.client import EmbedClient")
        say(
            "status   embedq status"
            if stack.url_file
            else f"status   embedq status --broker {redact(stack.broker_url)}"
        )
        say("Ctrl-C stops everything")
        while True:
            stack.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        failed = False
        raise
    finally:
        local_state.withdraw(announced)
        stack.stop(keep_logs=failed)
