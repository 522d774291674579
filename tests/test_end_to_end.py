"""The whole path with real worker processes: producer -> Redis -> Celery pool -> ordered output."""

from __future__ import annotations

import json
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


# Every pool flavour on the embedded server; the machine's Redis (CI) with the default prefork/fork.
FLAVOURS = [
    ("valkey", "prefork", "fork", 2),
    ("valkey", "prefork", "spawn", 2),
    ("valkey", "solo", "fork", 1),
    ("valkey", "threads", "fork", 2),
] + [("redis", "prefork", "fork", 2)] * ("redis" in _server_params())


@pytest.mark.parametrize(("server", "pool", "start_method", "concurrency"), FLAVOURS)
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
) -> None:
    # given workers of this pool flavour serving the tiny model
    broker = make_broker(request, server)
    request.addfinalizer(broker.cleanup)
    env = broker.env(model=str(tiny_bert), pool_start_method=start_method)
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
        # and forked children inherit torch from the worker main process; spawned ones import it themselves
        expected = "imports inherited from the worker process" if start_method == "fork" else "imported here"
        assert expected in worker.log(), worker.log()
