"""A fleet of simulated hosts on this machine: Linux network namespaces joined by a bridge.

Each host is a network namespace (and a UTS namespace, so `hostname` differs) with one veth into a
bridge that lives in the root namespace, an address in 198.18.0.0/24 (the benchmarking range), and a
TMPDIR of its own, so nothing is shared through loopback or /tmp. Redis runs on a host of its own;
the producer runs in the root namespace and reaches it through the bridge. Faults are real:
- `cut(host)` takes the host's link down (packets vanish, no RST: a partition), `heal(host)` restores it;
- `freeze(host)` SIGSTOPs every process of the host (a frozen VM), `thaw(host)` SIGCONTs them;
- `throttle(host, percent)` caps the host's CPU with a cgroup quota (a busy neighbour, a throttled VM).
`Network.close()` kills every process and removes every namespace, link and cgroup it made, also
when a test fails (the fixtures call it in a finally).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from producer.local.embedded_redis import valkey_binary
from producer.local.processes import start_process, stop_process

SUBNET = "198.18.0"
BRIDGE_ADDRESS = f"{SUBNET}.254"
REDIS_PORT = 6379
CPU_CGROUP = Path("/sys/fs/cgroup/cpu")
LOCK_PATH = Path("/tmp/embedq-fleet-network.lock")
LOCK_WAIT_S = 900.0


def _exclusive(path: Path, wait_s: float) -> int:
    """An exclusive flock on `path` (a file descriptor to close), waiting at most `wait_s` for it."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(f"another test run has held {path} for {wait_s:g} s") from None
            time.sleep(0.5)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def unavailable_reason() -> str:
    """Why namespaces cannot be made here, or "" when they can (root and iproute2)."""
    if os.geteuid() != 0:
        return "multi-host tests need root to make network namespaces"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "multi-host tests need `ip` (iproute2) and `unshare` (util-linux)"
    probe = f"eqprobe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as error:
        return f"cannot make a network namespace: {error}"
    _ip("netns", "del", probe)
    return ""


@dataclass
class Host:
    """One simulated machine: a namespace, an address, a TMPDIR, and the processes started on it."""

    name: str
    namespace: str
    address: str
    veth: str
    tmpdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, command: list[str], *, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
        """Start `command` on this host (its own process group, killed with the test)."""
        wrapped = [
            "ip", "netns", "exec", self.namespace,
            "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name,
            *command,
        ]  # fmt: skip
        process = start_process(wrapped, env={**env, "TMPDIR": str(self.tmpdir)}, log_path=log_path)
        self.processes.append(process)
        return process

    def pids(self) -> list[int]:
        """Every live process of this host: its process groups' members (pool children included)."""
        groups = {p.pid for p in self.processes if p.poll() is None}
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[2]) in groups:
                    found.append(int(stat.parent.name))
        return found

    def signal_all(self, signum: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signum)


class Network:
    """The bridge, the hosts on it, and every fault the tests inject; `close()` undoes all of it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Every network on this machine uses 198.18.0.0/24 from the root namespace: two at once would
        # fight over its route, so a second test run waits for the first one's network to close.
        self._lock = _exclusive(LOCK_PATH, LOCK_WAIT_S)
        self.tag = uuid.uuid4().hex[:5]
        self.bridge = f"eqb{self.tag}"
        self.hosts: dict[str, Host] = {}
        self.cgroups: list[Path] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_host(self, name: str, number: int) -> Host:
        """A namespace `eq<tag>-<name>` at 198.18.0.<number>, linked to the bridge."""
        namespace, veth, peer = f"eq{self.tag}-{name}", f"eqv{self.tag}{number}", f"eqp{self.tag}{number}"
        _ip("netns", "add", namespace)
        tmpdir = self.root / name
        tmpdir.mkdir(parents=True, exist_ok=True)
        host = Host(name, namespace, f"{SUBNET}.{number}", veth, tmpdir)
        self.hosts[name] = host  # from here on close() removes it, whatever fails next
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", namespace)
        for args in (
            ("link", "set", peer, "name", "eth0"),
            ("addr", "add", f"{host.address}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("link", "set", "lo", "up"),
        ):
            _ip("netns", "exec", namespace, "ip", *args)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        return host

    def start_redis(self, host: Host) -> str:
        """valkey-server on `host`, reachable from every host and the producer; returns its URL."""
        command = [
            valkey_binary(), "--port", str(REDIS_PORT), "--bind", host.address, "--protected-mode", "no",
            "--save", "", "--appendonly", "no", "--dir", str(host.tmpdir), "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        host.run(command, env={}, log_path=host.tmpdir / "valkey.log")
        url = f"redis://{host.address}:{REDIS_PORT}/0"
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return url
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    # -- faults --------------------------------------------------------------------------------

    def cut(self, host: Host) -> None:
        """Take the host's link down at the bridge: its packets vanish both ways, no connection is reset."""
        _ip("link", "set", host.veth, "down")

    def heal(self, host: Host) -> None:
        _ip("link", "set", host.veth, "up")

    def freeze(self, host: Host) -> None:
        host.signal_all(signal.SIGSTOP)

    def thaw(self, host: Host) -> None:
        host.signal_all(signal.SIGCONT)

    def throttle(self, host: Host, percent: float) -> Path:
        """Move every process of `host` into a cgroup capped at `percent` of one core."""
        group = CPU_CGROUP / f"embedq-{self.tag}-{host.name}"
        group.mkdir(exist_ok=True)
        self.cgroups.append(group)
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text(str(int(1000 * percent)))
        for pid in host.pids():
            with contextlib.suppress(OSError):
                (group / "cgroup.procs").write_text(str(pid))
        return group

    def unthrottle(self, host: Host) -> None:
        for pid in host.pids():
            with contextlib.suppress(OSError):
                (CPU_CGROUP / "cgroup.procs").write_text(str(pid))

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        for host in self.hosts.values():
            host.signal_all(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            for process in host.processes:
                with contextlib.suppress(Exception):
                    stop_process(process, timeout_s=5)
        for group in self.cgroups:
            for pid in (group / "cgroup.procs").read_text().split() if group.exists() else []:
                with contextlib.suppress(OSError):
                    (CPU_CGROUP / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()
        for host in self.hosts.values():
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _ip("link", "del", host.veth)
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _ip("netns", "del", host.namespace)
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            _ip("link", "del", self.bridge)
        os.close(self._lock)  # releases the flock
