"""Fixtures for the multi-host suite: Redis and two worker hosts in network namespaces, on defaults.

The fleet is built once per module (starting workers with a real model is the slow part) and each test
leaves it healthy for the next one: healed, thawed, unthrottled, both workers alive again. Workers
run the packaged all-MiniLM-L6-v2 with one pool child and one torch thread per host, so that a chunk
takes real compute time and a fault lands while a chunk is held. No timeout is shortened: the lease
TTL, broker timeouts and visibility timeout are embedq's defaults.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from tests.fleet.harness import TEXTS, Fleet, JobRun, start_fleet
from tests.fleet.netns import unavailable_reason

WORKER_HOSTS = ("host1", "host2")


def require_namespaces() -> None:
    """Skip where namespaces cannot be made; under CI=true that is a failure, not a skip."""
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the multi-host suite: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    require_namespaces()
    result = start_fleet(tmp_path_factory.mktemp("fleet"), WORKER_HOSTS)
    try:
        yield result
    finally:
        result.network.close()


@pytest.fixture(scope="module")
def clean_run(fleet: Fleet) -> JobRun:
    """The job with no fault: what every faulty run must reproduce, row for row."""
    run = fleet.run_job("clean")
    assert run.code == 0, run.stderr[-3000:]
    assert run.manifest()["resent_chunks"] == 0, run.manifest()
    return run


def assert_same_output(run: JobRun, clean: JobRun) -> None:
    """Every row once, in order, equal to the clean run's; ids in order; no partial file left."""
    assert run.code == 0, run.stderr[-3000:]
    matrix = run.matrix()
    assert matrix.shape == clean.matrix().shape
    np.testing.assert_allclose(matrix, clean.matrix(), atol=1e-5)
    manifest = run.manifest()
    assert manifest["ids"] == [f"doc-{i}" for i in range(len(TEXTS))]
    assert not list(run.out.parent.glob(run.out.name + ".partial*"))
