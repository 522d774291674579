"""The whole path with real worker processes: producer -> Redis -> Celery pool -> ordered output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import WorkerFactory, _server_params, make_broker, run_embedq, write_texts_jsonl
from workers.encoder import Encoder
from workers.protocol.model_info import resolve_model

TEXTS = [f"document number {i} says {'hello ' * (i % 17)}world" for i in range(300)] + ["", "   ", "many words " * 400]


@pytest.fixture(scope="module")
def reference(tiny_bert: Path) -> np.ndarray:
    """The same tiny model run in-process: what every pool flavour must reproduce row for row."""
    return Encoder.load(resolve_model(str(tiny_bert)), "cpu").encode(TEXTS).embeddings


# Every pool flavour on the embedded server, each runtime under prefork fork and the compiled ones under spawn
# and threads too; the machine's Redis (CI) with the defaults.
FLAVOURS = [
    ("valkey", "prefork", "fork", 2, "openvino"),
    ("valkey", "prefork", "spawn", 2, "openvino"),
    ("valkey", "prefork", "fork", 2, "onnxruntime"),
    ("valkey", "prefork", "spawn", 2, "onnxruntime"),
    ("valkey", "prefork", "fork", 2, "torch"),
    ("valkey", "solo", "fork", 1, "auto"),
    ("valkey", "threads", "fork", 2, "openvino"),
    ("valkey", "threads", "fork", 2, "onnxruntime"),
] + [("redis", "prefork", "fork", 2, "auto")] * ("redis" in _server_params())
#: The shared library each runtime's thread pool lives in: never mapped into a prefork parent.
RUNTIME_LIBRARIES = ("libopenvino", "libonnxruntime", "onnxruntime_pybind")


def _mapped(pid: int) -> set[str]:
    """The runtime libraries mapped into process `pid`."""
    maps = Path(f"/proc/{pid}/maps").read_text(errors="replace")
    return {name for name in RUNTIME_LIBRARIES if name in maps}


@pytest.mark.parametrize(("server", "pool", "start_method", "concurrency", "runtime"), FLAVOURS)
def test_every_pool_flavour_yields_the_reference_rows_in_order(
    request: pytest.FixtureRequest,
    workers: WorkerFactory,
    tiny_bert: Path,
    reference: np.ndarray,
    tmp_path: Path,
    server: str,
    pool: str,
    start_method: str,
    concurrency: int,
    runtime: str,
) -> None:
    # given workers of this pool flavour and runtime serving the tiny model (converted into a fresh cache)
    broker = make_broker(request, server)
    request.addfinalizer(broker.cleanup)
    env = broker.env(
        model=str(tiny_bert), pool_start_method=start_method, runtime=runtime, cache_dir=str(tmp_path / "cache")
    )
    worker = workers.start(env, pool=pool, concurrency=concurrency)
    corpus = write_texts_jsonl(tmp_path / "corpus.jsonl", TEXTS)
    out = tmp_path / "out.npy"

    # when the producer embeds the corpus through the broker in small chunks
    result = run_embedq(
        "embed",
        str(corpus),
        "-o",
        str(out),
        "--broker",
        broker.url,
        "--chunk-size",
        "32",
        "--model",
        str(tiny_bert),
        env={"EMBEDQ_KEY_PREFIX": broker.prefix},
    )

    # then every row is the in-process reference, in input order, and the manifest says so
    assert result.returncode == 0, result.stderr + worker.log()
    matrix = np.load(out)
    assert matrix.shape == reference.shape
    np.testing.assert_allclose(matrix, reference, atol=1e-5)
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["rows"] == len(TEXTS)
    assert manifest["ids"] == [f"doc-{i}" for i in range(len(TEXTS))]
    assert manifest["truncated"] == 1
    assert not list(tmp_path.glob("out.npy.partial*"))
    # and the model was loaded once per child, not per chunk (a child still loading when the job
    # ends has not said so yet: hence at most, not exactly)
    if pool == "prefork":
        assert 1 <= worker.log().count("ready:") <= concurrency, worker.log()
        # and forked torch children inherit torch from the worker main process; spawned ones import it themselves,
        # as do children of the other runtimes here, which convert the model into a fresh cache (with torch)
        inherits = start_method == "fork" and runtime == "torch"
        expected = "imports inherited from the worker process" if inherits else "imported here"
        assert expected in worker.log(), worker.log()
    # and the runtime asked for is the one that served the chunks
    if runtime != "auto":
        assert f"runtime {runtime}," in worker.log(), worker.log()
    # and under prefork its thread pool lives in the children only, never in the parent that forks them
    if pool == "prefork" and runtime in ("openvino", "onnxruntime"):
        assert not _mapped(worker.process.pid), "a runtime library is mapped into the prefork parent"
        ready = [int(pid) for pid in re.findall(r"embedq child (\d+) ready", worker.log())]
        assert ready and all(_mapped(child) for child in ready), "a ready child does not run the runtime"
