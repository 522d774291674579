"""Crash-loop markers: how a new pool child learns that its predecessor died while loading the model.

Each child leaves a marker file while it loads; a child that dies loading (SIGKILLed after
worker_proc_alive_timeout, or by the out-of-memory killer) leaves it behind. Its replacement would
die the same way, and the pool would respawn it forever, so a stale marker of a dead child makes the
worker stop instead. One folder per worker main process; a `stopping` marker says the worker is
already stopping for a reason given once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from workers.lifecycle import procfs


def folder_for(main_pid: int) -> Path:
    """Where the children of worker main process `main_pid` leave their markers."""
    return Path(tempfile.gettempdir()) / f"embedq-loading-{main_pid}"


def forget(main_pid: int) -> None:
    """Drop markers left by an earlier worker with this pid (pid 1 in every container restart)."""
    shutil.rmtree(folder_for(main_pid), ignore_errors=True)


class Markers:
    """The marker folder of one worker main process."""

    def __init__(self, main_pid: int) -> None:
        self.folder = folder_for(main_pid)

    def died_loading(self) -> bool:
        """True when a child's marker is there but that child is gone: it died loading the model."""
        self.folder.mkdir(exist_ok=True)
        return any(not procfs.is_alive(int(m.name.split("-", 1)[1])) for m in self.folder.glob("child-*"))

    @contextlib.contextmanager
    def loading(self, pid: int) -> Iterator[None]:
        """A marker for child `pid` while the block runs; it stays behind if the child dies in the block."""
        self.folder.mkdir(exist_ok=True)
        marker = self.folder / f"child-{pid}"
        marker.write_text(str(time.time()), encoding="ascii")
        yield
        marker.unlink(missing_ok=True)

    def mark_stopping(self) -> bool:
        """Record that the worker is stopping; False when another child already did (it said why)."""
        self.folder.mkdir(exist_ok=True)
        try:
            os.close(os.open(self.folder / "fatal", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def stopping(self) -> bool:
        """True once a child has stopped the worker for a start-up error."""
        return (self.folder / "fatal").exists()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
