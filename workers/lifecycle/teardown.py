"""Skip the interpreter's teardown once a worker has shut down: exit with its code at once.

With torch and transformers imported, Python's module teardown alone takes 1.3-1.9 s here, which
every stop of a worker paid (each `embedq embed` on the embedded default, `embedq up`, a rolling
restart). `register()` is called when workers.app is imported, so the exit runs after every atexit
handler registered later (Celery's pidfile removal, its state db): only the teardown itself is skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from typing import Any

#: The worker that finished its shutdown in this process (set by `worker_stopped`), else None.
_stopped_worker: Any = None


def worker_stopped(worker: Any) -> None:
    """Remember the worker whose shutdown just finished: its exit code is the process's."""
    global _stopped_worker
    _stopped_worker = worker


def exit_without_interpreter_teardown() -> None:
    """The atexit handler: once a worker has shut down, flush and `os._exit` with its code."""
    if _stopped_worker is None:  # not a worker that shut down: an import, a test, a failed start
        return
    code = _stopped_worker.exitcode
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else 0)


def register() -> None:
    """Install the handler (first, so that it runs last)."""
    atexit.register(exit_without_interpreter_teardown)
