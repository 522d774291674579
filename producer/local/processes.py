"""Child processes of the local stack that never outlive the command that started them.

Every process gets PR_SET_PDEATHSIG and its own process group, so even a SIGKILLed producer leaves no
orphan behind, and stopping one stops its pool children too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Run in the child before exec: get SIGTERM when the process that started us dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setsid()  # own process group, so that stopping it stops its pool children too


def start_process(args: Sequence[str], *, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `args` with its output appended to `log_path`; it dies with this process (PR_SET_PDEATHSIG)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(args),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )  # noqa: PLW1509 - no threads yet at this point


def stop_processes(
    processes: Sequence[subprocess.Popen[bytes]], timeout_s: float = 15.0, *, at_once: bool = False
) -> None:
    """Stop every process group together: SIGTERM (warm shutdown) to all, then wait for all; SIGKILL what is
    left after `timeout_s`. `at_once` SIGKILLs at once, for processes that have nothing left worth finishing.

    Signalling all before waiting for any makes the stop cost the slowest process, not their sum.
    """
    running = [p for p in processes if p.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL if at_once else signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # also any pool child that outlived its parent
        process.wait(timeout=5)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM the process group (warm shutdown), then SIGKILL what is left after `timeout_s`."""
    stop_processes([process], timeout_s)
