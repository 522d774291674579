"""Where a running `embedq up` (or embedded `embedq embed`) says which private broker it started.

`embedq status` with no --broker reads it. One JSON file per running process, in a folder only this
user can read ($XDG_RUNTIME_DIR/embedq, else /tmp/embedq-UID, mode 0700): the URL may carry a password.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Announced:
    """A broker a live embedq process started: what started it, and its URL."""

    pid: int
    kind: str
    broker_url: str
    started: float


def state_dir() -> Path:
    """The user-private folder, created on first use; refuses one that others could write."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    base = Path(runtime) / "embedq" if runtime and os.path.isdir(runtime) else Path(f"/tmp/embedq-{os.getuid()}")
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = base.lstat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077 or not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{base} is not a private folder of this user; remove it")
    return base


def announce(kind: str, broker_url: str, started: float) -> Path | None:
    """Record this process's broker; None when no private folder can be had (status then needs --broker)."""
    try:
        folder = state_dir()
        entry = {"pid": os.getpid(), "kind": kind, "broker_url": broker_url, "started": started}
        handle, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-")  # mode 0600
        with os.fdopen(handle, "w") as out:
            json.dump(entry, out)
        path = folder / f"{os.getpid()}.json"
        os.replace(temp, path)
        return path
    except OSError:
        return None


def withdraw(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running() -> list[Announced]:
    """Brokers of live processes, newest first; files of processes that died (SIGKILL) are removed."""
    try:
        folder = state_dir()
    except OSError:
        return []
    found = []
    for path in folder.glob("*.json"):
        try:
            entry = Announced(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if _alive(entry.pid):
            found.append(entry)
        else:
            withdraw(path)
    return sorted(found, key=lambda e: e.started, reverse=True)


def pick() -> Announced | None:
    """The broker `embedq status` should ask: the newest `embedq up`, else the newest embedded job."""
    entries = running()
    return next((e for e in entries if e.kind == "up"), entries[0] if entries else None)
