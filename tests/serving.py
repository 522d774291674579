"""Helpers for the serving tests: a real worker and real gateway processes on the embedded Valkey."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.local.cluster import worker_command
from producer.local.embedded_redis import free_port
from producer.local.processes import start_process, stop_process
from tests.conftest import ROOT, wait_until
from workers.protocol.config import Settings


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> tuple[int, Any]:
    """(status, parsed JSON or text) of one HTTP request; never raises on 4xx/5xx."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = int(error.code), error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def responds(url: str) -> bool:
    """True once anything answers HTTP at `url` (whatever the status)."""
    try:
        return http("GET", url)[0] > 0
    except OSError:
        return False


def python_env(**extra: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    return {**inherited, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}


@dataclass
class Fleet:
    """Workers and gateways on one broker and key prefix; `stop()` ends every process it started."""

    broker_url: str
    model: Path
    folder: Path
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return Settings(broker_url=self.broker_url, key_prefix=self.prefix, model=str(self.model))

    def env(self, **extra: str) -> dict[str, str]:
        return python_env(**{**self.settings.to_env(), **extra})

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> Path:
        log = self.folder / f"{name}-{len(self.processes)}.log"
        self.processes.append(start_process(argv, env=env, log_path=log))
        self.logs.append(log)
        return log

    def start_worker(self, concurrency: int = 1, *, wait: bool = True) -> Path:
        """Start a worker; with `wait`, return once its children are ready (else call `wait_ready(log)`)."""
        command = worker_command(concurrency, hostname=f"serve-{uuid.uuid4().hex[:6]}@test", loglevel="INFO")
        log = self._start("worker", command, self.env())
        if wait:
            self.wait_ready(log, concurrency)
        return log

    @staticmethod
    def wait_ready(log: Path, concurrency: int = 1) -> None:
        assert wait_until(lambda: log.read_text(errors="replace").count("ready:") >= concurrency, 120), log.read_text()

    def start_gateway(self, *flags: str, prefix: str | None = None) -> str:
        port = free_port()
        argv = [sys.executable, "-m", "producer.cli", "serve", "--port", str(port), *flags]
        env = self.env(**({"EMBEDQ_KEY_PREFIX": prefix} if prefix else {}))
        log = self._start("gateway", argv, env)
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: responds(f"{base}/v1/models") or self.processes[-1].poll() is not None, 60)
        assert self.processes[-1].poll() is None, log.read_text()
        return base

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in self.logs)

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process, timeout_s=10)
        self.processes.clear()


@dataclass
class UpStack:
    """A running `embedq up` (real Valkey, workers, Flower and gateway) and what it printed."""

    process: subprocess.Popen[bytes]
    log: Path
    port: int
    flower_port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def printed(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Until `embedq up` printed where everything is and its gateway's /health is green."""
        printed = "Ctrl-C stops everything"
        assert wait_until(lambda: printed in self.printed() or self.process.poll() is not None, 60), self.printed()
        assert self.process.poll() is None, self.printed()
        healthy = lambda: responds(f"{self.base}/health") and http("GET", f"{self.base}/health")[0] == 200  # noqa: E731
        assert wait_until(healthy, timeout_s), self.printed()

    def broker_url(self) -> str:
        """The embedded Valkey's URL with its password, from the 0600 file `embedq up` named."""
        found = re.search(r"the full URL is in (\S+),", self.printed())
        assert found, self.printed()
        return Path(found.group(1)).read_text().strip()

    def flower_auth(self) -> tuple[str, str]:
        """The (user, password) `embedq up` generated for Flower and printed once."""
        found = re.search(r"basic auth: user '([^']+)', password '([^']+)'", self.printed())
        assert found, self.printed()
        return found.group(1), found.group(2)


@contextlib.contextmanager
def embedq_up(folder: Path, model: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[UpStack]:
    """Start `embedq up` on free loopback ports with `model`; SIGTERM (then SIGKILL) it afterwards."""
    port, flower_port = free_port(), free_port()
    log = folder / "up.log"
    argv = [sys.executable, "-m", "producer.cli", "up", "--port", str(port), "--flower-port", str(flower_port)]
    process = start_process([*argv, "--model", str(model), *flags], env=python_env(**(env or {})), log_path=log)
    try:
        yield UpStack(process, log, port, flower_port)
    finally:
        stop_process(process, timeout_s=30)  # SIGTERM: `embedq up` stops what it started, then exits
