"""The Celery app and its signal wiring. Importing this module never imports torch.

Run workers with `embedq worker` or plainly `celery -A workers.app worker`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals

from workers.config import Settings, celery_config
from workers.errors import EmbedqError

log = logging.getLogger("embedq.worker")

#: Exit code of a worker that refused to start (bad model, not enough memory); see producer/exitcodes.py.
EXIT_WORKER_CONFIG = 78
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


def _is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


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


@signals.worker_shutdown.connect
def after_worker_stop(sender: Any = None, **_: Any) -> None:
    """Main process: exit 78 when a child stopped the worker for a start-up error; forget the markers."""
    folder = _loading_dir()
    if (folder / "fatal").exists() and sender is not None:
        sender.exitcode = EXIT_WORKER_CONFIG
    shutil.rmtree(folder, ignore_errors=True)


import workers.tasks  # noqa: E402,F401  (registers the tasks on `app`)
