"""The shutdown watchdog: a warm shutdown that outlives the hard time limit is ended, not waited for.

A warm shutdown waits for running chunks, and none can run past the hard time limit; a worker still
alive SHUTDOWN_GRACE_S after that is stuck in Celery's pool shutdown (seen once in CI, not reproduced
since). Exit then instead of hanging until a supervisor's SIGKILL: chunks not yet acknowledged go
back to the queue (acks_late), and writes are idempotent, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from workers.lifecycle import procfs

#: How long past the hard time limit a warm shutdown may take before the worker is deemed stuck.
SHUTDOWN_GRACE_S = 10.0


def start(task_time_limit_s: float, exitcode: int) -> threading.Timer:
    """Arm the watchdog in the worker main process, as its warm shutdown begins."""
    deadline_s = task_time_limit_s + SHUTDOWN_GRACE_S
    timer = threading.Timer(deadline_s, force_exit, args=(deadline_s, exitcode))
    timer.daemon = True  # never keeps a worker that did stop in time alive
    timer.start()
    return timer


def force_exit(deadline_s: float, exitcode: int) -> None:
    """Say so in one line, SIGKILL the pool children, and exit with `exitcode`."""
    from celery.worker import state

    running = len(state.active_requests)
    message = (
        f"warm shutdown still not finished after {deadline_s:g} s (hard time limit + {SHUTDOWN_GRACE_S:g} s); "
        f"exiting now, {running} unacknowledged chunk(s) go back to the queue"
    )
    # Straight to file descriptor 2: sys.stderr is Celery's logging proxy, and a stuck main thread may hold
    # the logging lock.
    os.write(2, f"embedq worker: {message}\n".encode())
    for child in procfs.child_pids():
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)
    os._exit(exitcode)
