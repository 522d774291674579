"""The worker of the fault tests: the production app, plus faults that real workers meet, played here.

Started as `celery -A tests.faults.fault_app worker ...` (tests/faults/conftest.py does it for every
fault test). With none of the variables below set, it is the production worker, hook for hook. Only
this module reads them; production code never sees a test switch.

    FAULT_KILL_ON_TEXT=MARK          a child given a text containing MARK SIGKILLs itself as it starts
                                     encoding (after the delivery is counted), as the OOM killer would
    FAULT_CHUNK_DELAY_S=S            every chunk sleeps S seconds as it starts encoding, so that a
                                     test's signal lands mid-chunk
    FAULT_LOAD_DELAY_S=S             each child's model load takes S seconds longer (a big model)
    FAULT_SHUTDOWN_HANG_S=S          the worker hangs S seconds once its pool has stopped (seen once in CI)
    FAULT_AVAILABLE_MEMORY_BYTES=N   the start-up memory check sees N bytes available (a small machine)

The names do not start with EMBEDQ_: the worker's own settings would refuse them as unknown.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from celery import signals

import workers.app as production
from workers import runtime
from workers.app import app
from workers.lifecycle import startup

__all__ = ["app"]

KILL_ON_TEXT = os.environ.get("FAULT_KILL_ON_TEXT", "")
CHUNK_DELAY_S = float(os.environ.get("FAULT_CHUNK_DELAY_S") or 0)
LOAD_DELAY_S = float(os.environ.get("FAULT_LOAD_DELAY_S") or 0)
SHUTDOWN_HANG_S = float(os.environ.get("FAULT_SHUTDOWN_HANG_S") or 0)
AVAILABLE_MEMORY_BYTES = os.environ.get("FAULT_AVAILABLE_MEMORY_BYTES", "")


def _faulty_encode(encode: Callable[..., Any]) -> Callable[..., Any]:
    """`encode` that first plays the chunk faults; it runs where a real chunk starts its work."""

    def encode_with_faults(texts: list[Any], *args: Any, **kwargs: Any) -> Any:
        if KILL_ON_TEXT and any(isinstance(text, str) and KILL_ON_TEXT in text for text in texts):
            os.kill(os.getpid(), signal.SIGKILL)
        if CHUNK_DELAY_S > 0:
            time.sleep(CHUNK_DELAY_S)
        return encode(texts, *args, **kwargs)

    return encode_with_faults


_production_init_process = runtime.init_process


def _init_process_with_faults(settings: Any) -> runtime.WorkerContext:
    """The production model load (called by workers/lifecycle/startup.py inside the crash-loop marker), slowed
    down and with a faulty encoder when asked."""
    if LOAD_DELAY_S > 0:
        time.sleep(LOAD_DELAY_S)
    context = _production_init_process(settings)
    if (KILL_ON_TEXT or CHUNK_DELAY_S > 0) and not getattr(context.encoder, "_faults", False):
        context.encoder.encode = _faulty_encode(context.encoder.encode)  # type: ignore[method-assign]
        context.encoder._faults = True  # type: ignore[attr-defined]
    return context


runtime.init_process = _init_process_with_faults

if AVAILABLE_MEMORY_BYTES:
    # The production check, given this machine's memory as the small number instead of the measured one.
    signals.worker_init.disconnect(production.before_worker_start)

    @signals.worker_init.connect
    def before_worker_start_on_a_small_machine(sender: Any = None, **_: Any) -> None:
        startup.before_worker_start(production.settings, sender, available_bytes=int(AVAILABLE_MEMORY_BYTES))


if SHUTDOWN_HANG_S > 0:

    @signals.worker_shutdown.connect
    def hang_after_the_pool_stopped(**_: Any) -> None:
        time.sleep(SHUTDOWN_HANG_S)
