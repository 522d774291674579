"""A task message cannot choose where a worker writes: disk results only under EMBEDQ_DISK_RESULTS_ROOT.

Anyone who can queue a task could otherwise name `disk:/any/folder` (or a job id full of `../`) and
have a worker write .npy files there. One real worker, started with a root; real task messages, sent
the way another program on the broker would send them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer.job.broker import send_chunk, sender_app
from tests.conftest import Broker, WorkerFactory
from tests.faults.conftest import wait_ready, worker_env
from workers.protocol.errors import ResultsRefused
from workers.protocol.keys import Keys
from workers.protocol.model_info import resolve_model
from workers.protocol.queues import BULK
from workers.protocol.routing import queue_name
from workers.protocol.store import open_store

pytestmark = pytest.mark.slow


def outcome(broker: Broker, job: str) -> dict[str, object]:
    """The completion event the worker published for chunk 0 of `job`."""
    client = broker.client()
    try:
        item = client.blpop([Keys(broker.prefix).events(job)], timeout=60)
    finally:
        client.close()
    assert item is not None, f"no event for {job}"
    return json.loads(item[1])  # type: ignore[no-any-return]


@pytest.mark.timeout(120)
def test_disk_results_outside_the_workers_root_are_refused_in_one_line(
    fault_broker: Broker, workers: WorkerFactory, tiny_bert: Path, tmp_path: Path
) -> None:
    # given a worker whose disk results root is tmp/root
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    worker = workers.start(worker_env(fault_broker, tiny_bert, disk_results_root=str(root)))
    wait_ready(worker)
    app = sender_app(fault_broker.settings())
    model = resolve_model(str(tiny_bert)).name
    asks = {
        "inside": f"disk:{root}/shards",
        "outside": f"disk:{elsewhere}",
        "dotdot": f"disk:{root}/../elsewhere",
    }
    # when tasks name a folder inside it, one outside it, and one that climbs out of it
    for name, spec in asks.items():
        send_chunk(app, f"job{name}", 0, ["a text"], {"model": model, "results": spec}, queue=queue_name(BULK, model))
    escape = {"model": model, "results": f"disk:{root}"}
    send_chunk(app, "../../escape", 0, ["a text"], escape, queue=queue_name(BULK, model))
    # then only the one inside is written; the others fail once with the reason, and nothing lands outside
    assert outcome(fault_broker, "jobinside")["type"] == "done"
    assert (root / "shards" / "jobinside" / "chunk-0000000.npy").exists()
    for name in ("outside", "dotdot"):
        event = outcome(fault_broker, f"job{name}")
        assert event["type"] == "failed", event
        reason = str(event["reason"])
        assert "refused" in reason and "EMBEDQ_DISK_RESULTS_ROOT" in reason and "\n" not in reason, reason
    escape = outcome(fault_broker, "../../escape")
    assert escape["type"] == "failed" and "not a plain name" in str(escape["reason"]), escape
    assert not elsewhere.exists() and not (tmp_path.parent / "escape").exists()
    app.close()


def test_a_worker_started_without_a_root_opens_no_disk_store(tmp_path: Path) -> None:
    # the same check the worker runs (WorkerContext.store) when EMBEDQ_DISK_RESULTS_ROOT is empty
    with pytest.raises(ResultsRefused, match="none was set"):
        open_store(f"disk:{tmp_path / 'anywhere'}", redis_url="redis://unused", key_prefix="x", ttl_s=1, disk_root="")
    assert not (tmp_path / "anywhere").exists()
