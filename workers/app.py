"""The Celery app and its signal wiring. Importing this module never imports torch.

Run workers with `embedq worker` or plainly `celery -A workers.app worker`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals

from workers.config import Settings, celery_config
from workers.errors import EmbedqError

log = logging.getLogger("embedq.worker")

#: Exit code of a worker that refused to start (bad model, not enough memory); see producer/exitcodes.py.
EXIT_WORKER_CONFIG = 78
#: How long past the hard time limit a warm shutdown may take before the worker is deemed stuck.
SHUTDOWN_GRACE_S = 10.0
#: Not an EMBEDQ_* setting: the worker main process's pid, inherited by fork and spawn children alike.
_MAIN_PID_VAR = "_EMBEDQ_WORKER_MAIN_PID"

settings = Settings.from_env()
app = Celery("embedq")
app.conf.update(celery_config(settings))


def _fatal(message: str) -> None:
    """One clear line, then stop the whole worker: a child that cannot load would only respawn forever."""
    print(f"embedq worker: {message}", file=sys.stderr, flush=True)
    log.critical("%s", message)


def _pool_settings(concurrency: int | None) -> Settings:
    return settings.replace(pool_concurrency=concurrency) if concurrency else settings


@signals.worker_init.connect
def before_worker_start(sender: Any = None, **_: Any) -> None:
    """Main process, before the pool forks: check memory and tell children their share of cores."""
    concurrency = int(getattr(sender, "concurrency", 0) or 0) or None
    pool_name = str(getattr(sender, "pool_cls", "prefork")).lower()
    os.environ[_MAIN_PID_VAR] = str(os.getpid())
    # Markers left by an earlier worker with this pid (pid 1 in every container restart) mean nothing now.
    shutil.rmtree(_loading_dir(), ignore_errors=True)
    if concurrency:
        # Pool children started with spawn re-read settings from the environment.
        os.environ["EMBEDQ_POOL_CONCURRENCY"] = str(concurrency)
    current = _pool_settings(concurrency)
    from workers import memory
    from workers.model_info import resolve_model

    try:
        # A hub name is resolved here too (its small JSON files only): an unreachable hub fails now, once.
        model = resolve_model(current.model)
        children = 1 if ("solo" in pool_name or "thread" in pool_name) else (concurrency or 1)
        if not current.skip_memory_check:
            memory.check_fits(model, current, children)
    except EmbedqError as error:
        _fatal(str(error))
        os._exit(EXIT_WORKER_CONFIG)
    if "thread" in pool_name:
        # The threads pool sends no worker_process_init: load once here, shared by all threads.
        _load_or_exit(current)
    elif "solo" not in pool_name and current.pool_start_method == "fork":
        _import_model_code(model)


def _import_model_code(model: Any) -> None:
    """Import torch, transformers and the model's classes here, once, so that forked children inherit them.

    Imports take most of a child's start (about 8 s of 8.3 here, the weights 0.3 s); each child paid them
    again. Only imports: no tensor op, no set_num_threads, no CUDA query, nothing that starts a thread pool
    (an OpenMP pool or CUDA context made before fork breaks the children). Spawned children import afresh.
    """
    started = time.monotonic()
    try:
        from workers.encoder import import_model_classes

        import_model_classes(model)
    except Exception as error:  # noqa: BLE001 - an optimisation only: the children import (and report) for themselves
        log.warning("embedq: could not pre-import the model code (%s); each child imports it", error)
        return
    elapsed_s = time.monotonic() - started
    log.info("embedq: imported torch, transformers and the model code in %.1f s before forking", elapsed_s)


def _loading_dir() -> Path:
    """Where pool children leave a marker while they load a model (one folder per worker main process)."""
    return Path(tempfile.gettempdir()) / f"embedq-loading-{os.environ.get(_MAIN_PID_VAR, os.getpid())}"


def _stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc/PID/stat file after the command name (state first, then ppid), or [] if gone."""
    try:
        return stat.read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _is_alive(pid: int) -> bool:
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return bool(fields) and fields[0] != "Z"


@signals.worker_process_init.connect
def before_child_start(**_: Any) -> None:
    """Each pool child (fork or spawn) and the solo pool: load the model once, here."""
    raw = os.environ.get("EMBEDQ_POOL_CONCURRENCY")
    current = _pool_settings(int(raw) if raw else None)
    # A child that died while loading (SIGKILLed after worker_proc_alive_timeout, or by the OOM killer)
    # leaves its marker behind; its replacement would die the same way, forever, so stop instead.
    folder = _loading_dir()
    folder.mkdir(exist_ok=True)
    if (folder / "fatal").exists():
        os._exit(EXIT_WORKER_CONFIG)  # the worker is stopping for a reason already given: nothing to add
    for marker in folder.glob("child-*"):
        if not _is_alive(int(marker.name.split("-", 1)[1])):
            _stop_worker(
                f"a pool child died while loading model {current.model or 'all-MiniLM-L6-v2'!r}: loading took longer "
                f"than EMBEDQ_PROC_ALIVE_TIMEOUT_S={current.proc_alive_timeout_s:g} s, or the out-of-memory killer "
                "stopped it; raise EMBEDQ_PROC_ALIVE_TIMEOUT_S, or use fewer children (--concurrency) or a smaller "
                "model"
            )
    marker = folder / f"child-{os.getpid()}"
    marker.write_text(str(time.time()), encoding="ascii")
    delay_s = float(os.environ.get("EMBEDQ_TEST_LOAD_DELAY_S") or 0)  # test-only: play a slow model load
    if delay_s > 0:
        time.sleep(delay_s)
    _load_or_exit(current)
    marker.unlink(missing_ok=True)


def _load_or_exit(current: Settings) -> None:
    from workers import runtime

    try:
        runtime.init_process(current)
    except EmbedqError as error:
        _stop_worker(str(error))
    except Exception as error:  # damaged weights etc.: a child without a model must not look healthy to pings
        _stop_worker(f"model {current.model!r} could not be loaded: {type(error).__name__}: {error}")


def _stop_worker(message: str) -> None:
    """From a pool child: say why in one line, stop the whole worker (exit code 78), and exit."""
    main_pid = int(os.environ.get(_MAIN_PID_VAR, "0"))
    if not main_pid or main_pid == os.getpid():
        _fatal(message)
        os._exit(EXIT_WORKER_CONFIG)
    try:
        # The first child to fail says why; siblings failing the same way add nothing.
        os.close(os.open(_loading_dir() / "fatal", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        _fatal(message)
    except FileExistsError:
        pass
    # Stop the worker too: a pool would respawn a child that cannot load forever.
    os.kill(main_pid, signal.SIGTERM)
    os._exit(EXIT_WORKER_CONFIG)


@signals.worker_shutting_down.connect
def bound_warm_shutdown(sender: Any = None, how: str = "Warm", exitcode: Any = 0, **_: Any) -> None:
    """Main process, on SIGTERM/SIGINT: make sure the warm shutdown ends.

    A warm shutdown waits for running chunks, and none can run past the hard time limit; a worker still
    alive SHUTDOWN_GRACE_S after that is stuck in Celery's pool shutdown (seen once in CI, not
    reproduced since). Exit then instead of hanging until a supervisor's SIGKILL: chunks not yet
    acknowledged go back to the queue (acks_late), and writes are idempotent, so nothing is lost.
    """
    if how != "Warm" or os.getpid() != int(os.environ.get(_MAIN_PID_VAR, os.getpid())):
        return
    deadline_s = settings.task_time_limit_s + SHUTDOWN_GRACE_S
    watchdog = threading.Timer(deadline_s, _force_exit, args=(deadline_s, int(exitcode or 0)))
    watchdog.daemon = True  # never keeps a worker that did stop in time alive
    watchdog.start()


def _force_exit(deadline_s: float, exitcode: int) -> None:
    from celery.worker import state

    running = len(state.active_requests)
    message = (
        f"warm shutdown still not finished after {deadline_s:g} s (hard time limit + {SHUTDOWN_GRACE_S:g} s); "
        f"exiting now, {running} unacknowledged chunk(s) go back to the queue"
    )
    # Straight to file descriptor 2: sys.stderr is Celery's logging proxy, and a stuck main thread may hold
    # the logging lock.
    os.write(2, f"embedq worker: {message}\n".encode())
    for child in _child_pids():
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)
    os._exit(exitcode)


def _child_pids() -> list[int]:
    """Pids of this process's children (the pool), from /proc: billiard's own bookkeeping may be what hangs."""
    me = str(os.getpid())
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat") if _stat_fields(stat)[1:2] == [me]]


@signals.worker_shutdown.connect
def after_worker_stop(sender: Any = None, **_: Any) -> None:
    """Main process: exit 78 when a child stopped the worker for a start-up error; forget the markers."""
    hang_s = float(os.environ.get("EMBEDQ_TEST_SHUTDOWN_HANG_S") or 0)  # test-only: play a stuck shutdown
    if hang_s > 0:
        time.sleep(hang_s)
    folder = _loading_dir()
    if (folder / "fatal").exists() and sender is not None:
        sender.exitcode = EXIT_WORKER_CONFIG
    shutil.rmtree(folder, ignore_errors=True)
    global _stopped_worker
    _stopped_worker = sender


#: The worker that finished its shutdown in this process (set by worker_shutdown), else None.
_stopped_worker: Any = None


def _exit_without_interpreter_teardown() -> None:
    """Once a worker has shut down, exit with its code and skip tearing down the interpreter.

    With torch and transformers imported, Python's module teardown alone takes 1.3-1.9 s here, which
    every stop of a worker paid (each `embedq embed` on the embedded default, `embedq up`, a rolling
    restart). Registered when workers.app is imported, so it runs after every atexit handler registered
    later (Celery's pidfile removal, its state db): only the teardown itself is skipped.
    """
    if _stopped_worker is None:  # not a worker that shut down: an import, a test, a failed start
        return
    code = _stopped_worker.exitcode
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else 0)


atexit.register(_exit_without_interpreter_teardown)


import workers.tasks  # noqa: E402,F401  (registers the tasks on `app`)
