"""One contract for every ResultStore: the same tests run on Redis (each test server) and on disk."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import _server_params, make_broker
from workers.protocol.keys import Keys
from workers.protocol.store import DiskStore, RedisStore, ResultStore

TTL_S = 600


@contextlib.contextmanager
def _redis_store_on(request: pytest.FixtureRequest, server: str) -> Iterator[RedisStore]:
    broker = make_broker(request, server)
    client = broker.client()
    try:
        yield RedisStore(client, Keys(broker.prefix), TTL_S)
    finally:
        client.close()
        broker.cleanup()


@pytest.fixture(params=_server_params())
def redis_store(request: pytest.FixtureRequest) -> Iterator[RedisStore]:
    """A RedisStore on the embedded Valkey (and on the machine's Redis in CI), its keys removed after."""
    with _redis_store_on(request, request.param) as store:
        yield store


@pytest.fixture(params=[f"redis-{server}" for server in _server_params()] + ["disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResultStore]:
    """Every store implementation, fresh: the contract below must hold for each."""
    if request.param == "disk":
        yield DiskStore(tmp_path / "results")
        return
    with _redis_store_on(request, request.param.removeprefix("redis-")) as store:
        yield store


def _matrix(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    values[0, 0] = np.float32(1e-45)  # a subnormal: survives only if bytes are kept exactly
    return values


def test_put_then_get_returns_the_exact_bytes(store: ResultStore) -> None:
    # given a float32 matrix
    matrix = _matrix(7, 5)
    # when it is stored and read back
    store.put("job1", 0, matrix)
    got = store.get("job1", 0)
    # then the very same bytes, shape and dtype come back
    assert got is not None
    assert got.dtype == np.float32 and got.shape == (7, 5)
    assert got.tobytes() == matrix.tobytes()


def test_put_converts_other_dtypes_and_layouts_to_contiguous_float32(store: ResultStore) -> None:
    matrix = _matrix(4, 6).astype(np.float64).T  # Fortran-ordered float64
    store.put("job1", 3, matrix)
    got = store.get("job1", 3)
    assert got is not None
    np.testing.assert_array_equal(got, matrix.astype(np.float32))


def test_putting_a_chunk_again_is_idempotent(store: ResultStore) -> None:
    # given a chunk already stored
    first = _matrix(3, 4, seed=1)
    store.put("job1", 1, first)
    # when the same chunk is stored again (a redelivered task), and once more with other values
    store.put("job1", 1, first)
    assert store.get("job1", 1).tobytes() == first.tobytes()  # type: ignore[union-attr]
    second = _matrix(2, 4, seed=2)
    store.put("job1", 1, second)
    # then exactly one matrix is kept for the chunk: the last one written
    assert store.get("job1", 1).tobytes() == second.tobytes()  # type: ignore[union-attr]


def test_get_of_a_missing_chunk_is_none(store: ResultStore) -> None:
    store.put("job1", 0, _matrix(1, 2))
    assert store.get("job1", 1) is None
    assert store.get("other-job", 0) is None


def test_delete_forgets_one_chunk_and_deleting_twice_is_fine(store: ResultStore) -> None:
    store.put("job1", 0, _matrix(1, 2))
    store.put("job1", 1, _matrix(1, 2))
    store.delete("job1", 0)
    store.delete("job1", 0)
    store.delete("job1", 99)
    assert store.get("job1", 0) is None
    assert store.get("job1", 1) is not None


def test_delete_job_forgets_every_chunk_of_that_job_only(store: ResultStore) -> None:
    for chunk in range(12):
        store.put("job1", chunk, _matrix(1, 2))
    store.put("job2", 0, _matrix(1, 2))
    store.delete_job("job1")
    assert all(store.get("job1", chunk) is None for chunk in range(12))
    assert store.get("job2", 0) is not None
    store.delete_job("never-seen")


def test_a_window_table_is_stored_and_forgotten_with_its_matrix(store: ResultStore) -> None:
    # given a --long chunks result: 3 window rows and their table (document, window, token_start, token_end)
    matrix = _matrix(3, 4)
    table = np.array([[0, 0, 0, 5], [1, 0, 0, 30], [1, 1, 23, 40]], dtype=np.int64)
    store.put("job1", 0, matrix, windows=table)
    # when it is read back whole, and as a plain matrix
    got = store.get_chunk("job1", 0)
    # then both come back exactly (the table as int32), and the plain read still sees the matrix alone
    assert got is not None and got.windows is not None
    assert got.array.tobytes() == matrix.tobytes()
    assert got.windows.dtype == np.int32 and got.windows.tolist() == table.tolist()
    assert store.get("job1", 0).tobytes() == matrix.tobytes()  # type: ignore[union-attr]
    # and storing the chunk again without a table replaces it whole; a delete forgets everything
    store.put("job1", 0, matrix)
    assert store.get_chunk("job1", 0).windows is None  # type: ignore[union-attr]
    store.put("job1", 0, matrix, windows=table)
    store.delete("job1", 0)
    assert store.get_chunk("job1", 0) is None
    # and a table that does not give one row per matrix row is refused before anything is written
    with pytest.raises(ValueError, match="one row per"):
        store.put("job1", 1, matrix, windows=table[:2])
    assert store.get("job1", 1) is None


def test_redis_results_expire(redis_store: RedisStore) -> None:
    # Only Redis results carry a TTL; disk results are deleted by the producer once collected.
    redis_store.put("job1", 0, _matrix(1, 2))
    ttl = redis_store.client.ttl(redis_store.keys.result("job1", 0))
    assert 0 < ttl <= TTL_S
