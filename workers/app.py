"""The Celery app and its signal wiring. Importing this module never imports torch.

Run workers with `embedq worker` or plainly `celery -A workers.app worker`. Each concern lives in its
own module; this one only connects them to Celery's signals:
- workers/lifecycle/startup.py: model and memory checks before the pool forks, the model load in each child;
- workers/lifecycle/crash_loop.py: markers that stop a worker whose children die while loading;
- workers/lifecycle/watchdog.py: a warm shutdown that hangs past the hard time limit is ended;
- workers/lifecycle/teardown.py: a stopped worker skips the interpreter's slow teardown.
The tasks (workers/tasks.py) are imported by Celery through `include`, so they may import `app`.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

from workers.lifecycle import startup, teardown, watchdog
from workers.lifecycle.startup import EXIT_WORKER_CONFIG
from workers.protocol.config import Settings, celery_config
from workers.protocol.model_info import model_identity
from workers.protocol.routing import worker_queues

__all__ = ["EXIT_WORKER_CONFIG", "app", "settings"]

settings = Settings.from_env()
app = Celery("embedq", include=["workers.tasks"])
app.conf.update(celery_config(settings))


@signals.worker_init.connect
def before_worker_start(sender: Any = None, **_: Any) -> None:
    """Main process, before the pool forks: check model and memory, tell children their share of cores."""
    startup.before_worker_start(settings, sender)


@signals.worker_process_init.connect
def before_child_start(**_: Any) -> None:
    """Each pool child (fork or spawn) and the solo pool: load the model once, here."""
    startup.before_child_start(settings)


@signals.worker_shutting_down.connect
def bound_warm_shutdown(sender: Any = None, how: str = "Warm", exitcode: Any = 0, **_: Any) -> None:
    """Main process, on SIGTERM/SIGINT: make sure the warm shutdown ends (workers/lifecycle/watchdog.py)."""
    if how == "Warm" and os.getpid() == (startup.main_pid() or os.getpid()):
        watchdog.start(settings.task_time_limit_s, int(exitcode or 0))


#: This worker's liveness key renewer (workers/protocol/liveness.py), started once the worker is ready.
_beacon: Any = None


@signals.worker_ready.connect
def after_worker_ready(sender: Any = None, **_: Any) -> None:
    """Main process: tell the fleet this worker is alive, for as long as it is (a key with a short TTL)."""
    global _beacon
    from workers.protocol.keys import Keys, connect
    from workers.protocol.liveness import WorkerBeacon
    from workers.runtime import worker_socket_options

    hostname = str(getattr(sender, "hostname", "") or os.getpid())
    queues = sorted(q.name for q in getattr(getattr(sender, "task_consumer", None), "queues", []) or [])
    # The model by the name producers route by, and the queues this worker really consumes (-Q may narrow
    # them): readers of the liveness keys learn which models are served on which lane (workers/protocol/served.py).
    info = {"queues": queues or worker_queues(settings.model), "model": model_identity(settings.model)}
    client = connect(settings.broker_url, check=False, **worker_socket_options(settings))
    _beacon = WorkerBeacon(client, Keys(settings.key_prefix), hostname, info, settings.lease_ttl_s).start()


@signals.worker_shutdown.connect
def after_worker_stop(sender: Any = None, **_: Any) -> None:
    """Main process: exit 78 when a child stopped the worker for a start-up error; forget the markers."""
    if _beacon is not None:
        _beacon.stop()
    startup.exit_code_after_stop(sender)
    teardown.worker_stopped(sender)


teardown.register()
