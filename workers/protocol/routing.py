"""Routing by model: each model has its own pair of lanes, so a chunk only reaches workers that serve it.

A worker serves the one model it was started with (`EMBEDQ_MODEL`, `embedq worker --model`) and
consumes that model's queues, `interactive` before `bulk`. The packaged default keeps the plain names
(`interactive`, `bulk`), so a one-model fleet looks as it always did and `celery -A workers.app worker
-Q interactive,bulk` stays true; any other model gets `LANE.MODEL` (`bulk.bge-small-en-v1.5`,
`interactive.org/name`): readable in Flower, in `redis-cli` and in `/metrics`. Lanes never contain a dot,
so `split_queue` reads the lane and the model back from any queue name.

Everything that sends a chunk asks `queue_name(lane, model)`: the first send, every re-send and backup
copy of the dispatcher (they reuse the job's queue), the clients and the gateway. A worker that still
receives a chunk for another model (a hand-written `-Q`) refuses it (`ModelMismatch` in workers/tasks.py).
"""

from __future__ import annotations

from workers.protocol.model_info import DEFAULT_MODEL_NAME, model_identity
from workers.protocol.queues import BULK, INTERACTIVE

#: The lanes of one model, in the order a worker polls them.
LANES = (INTERACTIVE, BULK)
_SEPARATOR = "."
#: Characters that cannot appear in a queue name on a command line (`-Q a,b`) or in a label: replaced.
_UNSAFE = str.maketrans({",": "_", " ": "_", "\t": "_", "\n": "_", '"': "_", "\\": "_"})


def queue_name(lane: str, model: str) -> str:
    """The queue that carries `lane` work for `model` (a model identity, or "" for the packaged default)."""
    if lane not in LANES:
        raise ValueError(f"lane {lane!r}: choose one of {', '.join(LANES)}")
    if not model or model == DEFAULT_MODEL_NAME:
        return lane
    return f"{lane}{_SEPARATOR}{model.translate(_UNSAFE)}"


def model_queues(model: str, lanes: tuple[str, ...] | list[str] = LANES) -> list[str]:
    """The queues of `lanes` for a worker serving `model`, in the order given (by default `interactive` first)."""
    return [queue_name(lane, model) for lane in lanes]


def worker_queues(model_setting: str, lanes: tuple[str, ...] | list[str] = LANES) -> list[str]:
    """`model_queues` for a worker started with EMBEDQ_MODEL=`model_setting` (a path, a hub name or "")."""
    return model_queues(model_identity(model_setting), lanes)


def split_queue(queue: str) -> tuple[str, str]:
    """(lane, model) of a queue name; the plain lanes belong to the packaged default."""
    lane, _, model = queue.partition(_SEPARATOR)
    return lane, model or DEFAULT_MODEL_NAME


def node_name(model_setting: str) -> str:
    """The default Celery node name of `embedq worker` for EMBEDQ_MODEL=`model_setting`.

    `embedq@%h` for the packaged default; `embedq-MODEL@%h` for another, so that workers of two models can run
    on one host without `-n` (Celery refuses two nodes of one name) and Flower tells them apart at a glance.
    """
    model = model_identity(model_setting)
    if model == DEFAULT_MODEL_NAME:
        return "embedq@%h"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model)
    return f"embedq-{safe}@%h"
