"""Start-up checks of a worker: refuse, in one line and with exit code 78, a worker that cannot serve.

The main process resolves the model and checks that the children fit in memory before it forks one;
each child loads the model once. Any EmbedqError on the way stops the whole worker, since a pool would
only respawn a child that cannot load, forever.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

from workers.lifecycle import crash_loop, memory
from workers.protocol import extras
from workers.protocol.config import Settings
from workers.protocol.errors import EmbedqError

log = logging.getLogger("embedq.worker")

#: Exit code of a worker that refused to start (bad model, not enough memory); see producer/cli/exitcodes.py.
EXIT_WORKER_CONFIG = 78
#: Not an EMBEDQ_* setting: the worker main process's pid, inherited by fork and spawn children alike.
MAIN_PID_VAR = "_EMBEDQ_WORKER_MAIN_PID"
#: Pool children started with spawn re-read settings from the environment: their share of the cores.
_POOL_CONCURRENCY_VAR = "EMBEDQ_POOL_CONCURRENCY"


def fatal(message: str) -> None:
    """One clear line on stderr (the line `LocalCluster.last_words` looks for), and in the log."""
    print(f"embedq worker: {message}", file=sys.stderr, flush=True)
    log.critical("%s", message)


def main_pid() -> int:
    """The worker main process's pid, as recorded before the pool started (0 before that)."""
    return int(os.environ.get(MAIN_PID_VAR, "0"))


def pool_settings(settings: Settings, concurrency: int | None) -> Settings:
    """`settings` with the pool's size filled in, so that each child takes its share of the cores."""
    return settings.replace(pool_concurrency=concurrency) if concurrency else settings


def before_worker_start(settings: Settings, sender: Any, *, available_bytes: int | None = None) -> None:
    """Main process, before the pool forks: check the model and memory; pre-import the model code.

    `available_bytes` is the memory the children may use (default: what this machine or cgroup has left).
    """
    concurrency = int(getattr(sender, "concurrency", 0) or 0) or None
    pool_name = str(getattr(sender, "pool_cls", "prefork")).lower()
    os.environ[MAIN_PID_VAR] = str(os.getpid())
    crash_loop.forget(os.getpid())
    if concurrency:
        os.environ[_POOL_CONCURRENCY_VAR] = str(concurrency)
    current = pool_settings(settings, concurrency)
    from workers.protocol.model_info import resolve_model

    try:
        extras.require("this worker", "worker")  # `celery -A workers.app worker` on a light install
        # A hub name is resolved here too (its small JSON files only): an unreachable hub fails now, once.
        model = resolve_model(current.model)
        children = 1 if ("solo" in pool_name or "thread" in pool_name) else (concurrency or 1)
        if not current.skip_memory_check:
            memory.check_fits(model, current, children, available_bytes=available_bytes)
    except EmbedqError as error:
        fatal(str(error))
        os._exit(EXIT_WORKER_CONFIG)
    if "thread" in pool_name:
        # The threads pool sends no worker_process_init: load once here, shared by all threads.
        load_or_exit(current)
    elif "solo" not in pool_name and current.pool_start_method == "fork":
        if runs_torch(current):
            import_model_code(model)
        else:
            import_encoder_code()


def runs_torch(settings: Settings) -> bool:
    """Whether the children will run the torch runtime (so inherit torch from here), decided without torch.

    A child on OpenVINO or ONNX Runtime imports neither torch nor transformers (2-3 s here) unless it has to
    convert the model first; importing them here would only make every such worker start later."""
    from workers.encoder.backend import choose_runtime
    from workers.encoder.device import cuda_possible

    if settings.device not in ("cpu", "auto") or (settings.device == "auto" and cuda_possible()):
        return True  # a GPU may be there: asking torch would be the import this saves; torch is the CUDA path
    try:
        from workers.encoder.device import resolve_dtype

        return choose_runtime(settings.runtime, "cpu", resolve_dtype(settings.dtype, "cpu")) == "torch"
    except EmbedqError:
        return True  # the child reports the bad setting itself


def import_encoder_code() -> None:
    """For children on OpenVINO or ONNX Runtime: import the encoder (numpy, the tokenizers library) here, once.

    Never the runtime's own package: its thread pool must not exist in the parent (tests/test_end_to_end.py
    checks that no runtime library is mapped here). Saves each child about 0.2 s of its start."""
    try:
        import workers.encoder.tokenizer  # noqa: F401 - imported for the children to inherit
        import workers.runtime  # noqa: F401
    except Exception as error:  # noqa: BLE001 - an optimisation only: the children import (and report) for themselves
        log.warning("embedq: could not pre-import the encoder (%s); each child imports it", error)


def import_model_code(model: Any) -> None:
    """Import torch, transformers and the model's classes here, once, so that forked children inherit them.

    Imports take most of a child's start (about 8 s of 8.3 here, the weights 0.3 s); each child paid them
    again. Only imports: no tensor op, no set_num_threads, no CUDA query, nothing that starts a thread pool
    (an OpenMP pool or CUDA context made before fork breaks the children). Spawned children import afresh.
    """
    started = time.monotonic()
    try:
        from workers.encoder.torch_backend import import_model_classes

        import_model_classes(model)
    except Exception as error:  # noqa: BLE001 - an optimisation only: the children import (and report) for themselves
        log.warning("embedq: could not pre-import the model code (%s); each child imports it", error)
        return
    elapsed_s = time.monotonic() - started
    log.info("embedq: imported torch, transformers and the model code in %.1f s before forking", elapsed_s)


def before_child_start(settings: Settings) -> None:
    """Each pool child (fork or spawn) and the solo pool: load the model once, guarded against crash loops."""
    raw = os.environ.get(_POOL_CONCURRENCY_VAR)
    current = pool_settings(settings, int(raw) if raw else None)
    markers = crash_loop.Markers(main_pid() or os.getpid())
    if markers.stopping():
        os._exit(EXIT_WORKER_CONFIG)  # the worker is stopping for a reason already given: nothing to add
    if markers.died_loading():
        # A child that died while loading (SIGKILLed after worker_proc_alive_timeout, or by the OOM killer)
        # left its marker behind; this one would die the same way, forever, so stop instead.
        stop_worker(
            f"a pool child died while loading model {current.model or 'all-MiniLM-L6-v2'!r}: loading took longer "
            f"than EMBEDQ_PROC_ALIVE_TIMEOUT_S={current.proc_alive_timeout_s:g} s, or the out-of-memory killer "
            "stopped it; raise EMBEDQ_PROC_ALIVE_TIMEOUT_S, or use fewer children (--concurrency) or a smaller "
            "model"
        )
    with markers.loading(os.getpid()):
        load_or_exit(current)


def load_or_exit(current: Settings) -> None:
    """Build this process's worker context (the model loaded), or stop the worker saying why."""
    from workers import runtime

    try:
        runtime.init_process(current)
    except EmbedqError as error:
        stop_worker(str(error))
    except Exception as error:  # damaged weights etc.: a child without a model must not look healthy to pings
        stop_worker(f"model {current.model!r} could not be loaded: {type(error).__name__}: {error}")


def stop_worker(message: str) -> None:
    """From a pool child: say why in one line, stop the whole worker (exit code 78), and exit."""
    main = main_pid()
    if not main or main == os.getpid():
        fatal(message)
        os._exit(EXIT_WORKER_CONFIG)
    # The first child to fail says why; siblings failing the same way add nothing.
    if crash_loop.Markers(main).mark_stopping():
        fatal(message)
    # Stop the worker too: a pool would respawn a child that cannot load forever.
    os.kill(main, signal.SIGTERM)
    os._exit(EXIT_WORKER_CONFIG)


def exit_code_after_stop(sender: Any) -> None:
    """Main process, once stopped: exit 78 when a child stopped the worker for a start-up error."""
    markers = crash_loop.Markers(os.getpid())
    if markers.stopping() and sender is not None:
        sender.exitcode = EXIT_WORKER_CONFIG
    markers.remove()
