"""A fleet of namespaced hosts loses, freezes, partitions and slows one of its machines mid-job.

Every test asserts the output (identical to the clean run), the reason chunks were sent again, and
that no result key is left in Redis; each leaves the fleet healthy for the next test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest

from tests.conftest import ROOT, wait_until
from tests.fleet.conftest import assert_same_output
from tests.fleet.harness import TEXTS, Fleet, JobRun
from tests.fleet.netns import Host

pytestmark = pytest.mark.slow


def _resent(run: JobRun) -> dict[str, int]:
    return dict(run.manifest()["resent_by_reason"])  # type: ignore[call-overload]


def _resent_for_lost_holder(run: JobRun) -> int:
    """Copies sent again because a holder went silent, or, when the fault hit the job's last chunks, because
    the silent holder's chunk was the tail's straggler (whichever of the two rules fired first)."""
    resent = _resent(run)
    return resent.get("holder_silent", 0) + resent.get("straggler_backup", 0)


def _wait_holding(fleet: Fleet, host: str, timeout_s: float = 60) -> None:
    """Until `host` holds a chunk lease: the fault then lands mid-chunk."""
    assert wait_until(lambda: host in fleet.holders(), timeout_s, 0.05), fleet.log(host)[-2000:]


def _job_with_host2_faulted(
    fleet: Fleet, name: str, fault: Callable[[Host], None], undo: Callable[[Host], None]
) -> JobRun:
    """A job during which host2 suffers `fault` while it holds a chunk, undone only once the job is over."""
    host2 = fleet.hosts["host2"]
    started = time.monotonic()
    process, out = fleet.start_job(name)
    try:
        _wait_holding(fleet, "host2")
        fault(host2)
        return fleet.finish(process, out, started)
    finally:
        undo(host2)


def _status_of_newest_job(fleet: Fleet) -> str:
    client = fleet.client()
    try:
        (job,) = client.zrevrange(f"{fleet.prefix}:jobs", 0, 0)
    finally:
        client.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EMBEDQ_KEY_PREFIX": fleet.prefix}
    command = [sys.executable, "-m", "producer.cli", "status", job.decode(), "--broker", fleet.url]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _wait_no_result_keys(fleet: Fleet, timeout_s: float = 30) -> None:
    assert wait_until(lambda: not fleet.result_keys(), timeout_s, 0.5), fleet.result_keys()


def test_clean_run_matches_the_encoder_in_process(fleet: Fleet, clean_run: JobRun) -> None:
    # given the fleet's clean output, when the first and the last chunk are embedded in this process
    from workers.encoder import Encoder
    from workers.protocol.model_info import resolve_model

    encoder = Encoder.load(resolve_model(""), "cpu")
    head, tail = encoder.encode(TEXTS[:32]).embeddings, encoder.encode(TEXTS[-32:]).embeddings
    # then they are the same rows, in the same places
    matrix = clean_run.matrix()
    assert float(np.min(np.sum(matrix[:32] * head, axis=1))) >= 0.99999
    assert float(np.min(np.sum(matrix[-32:] * tail, axis=1))) >= 0.99999
    assert fleet.succeeded("host1") > 0 and fleet.succeeded("host2") > 0  # both hosts served the job
    assert not fleet.result_keys()


def test_a_host_cut_off_mid_job_has_its_chunk_sent_again_within_seconds(fleet: Fleet, clean_run: JobRun) -> None:
    # given a job twice the clean one's length (so that the cut lands well before its tail, where the
    # straggler rule would step in first), with host2 holding one of its first chunks
    started = time.monotonic()
    process, out = fleet.start_job("cut", texts=TEXTS + TEXTS)
    try:
        _wait_holding(fleet, "host2")
        # when host2's link is cut (and stays cut until the job is over)
        fleet.network.cut(fleet.hosts["host2"])
        run = fleet.finish(process, out, started)
    finally:
        fleet.network.heal(fleet.hosts["host2"])
    # then the job completes on host1 alone, exactly: both halves equal the clean run's rows ...
    assert run.code == 0, run.stderr[-3000:]
    matrix, clean = run.matrix(), clean_run.matrix()
    np.testing.assert_allclose(matrix[: len(TEXTS)], clean, atol=1e-5)
    np.testing.assert_allclose(matrix[len(TEXTS) :], clean, atol=1e-5)
    assert run.manifest()["ids"] == [f"doc-{i}" for i in range(2 * len(TEXTS))]
    # ... because host2's chunk was sent again on default settings, within seconds instead of the visibility
    # timeout (an hour): by the lease rule once its lease TTL (10 s) runs out, or by the straggler rule when host1
    # alone reaches the job's tail first (a quiet machine ran the doubled job in 10.2 s, under the TTL + a tick)
    assert _resent_for_lost_holder(run) >= 1, run.manifest()
    if _resent(run).get("holder_silent"):
        assert "went silent" in run.stderr
    assert run.wall_s < 2 * clean_run.wall_s + 30, (run.wall_s, clean_run.wall_s)
    _wait_no_result_keys(fleet)
    fleet.wait_all_alive()  # host2 comes back by itself once healed


def test_a_partitioned_host_healed_after_the_job_serves_the_next_job_and_leaves_no_trace(
    fleet: Fleet, clean_run: JobRun
) -> None:
    # given host2 partitioned mid-job, healed only once the job is over
    run = _job_with_host2_faulted(fleet, "partition", fleet.network.cut, fleet.network.heal)
    assert_same_output(run, clean_run)
    assert _resent_for_lost_holder(run) >= 1, run.manifest()
    # when it is healed: it reconnects by itself, its late copy leaves no result key ...
    fleet.wait_all_alive()
    _wait_no_result_keys(fleet)
    # ... and it serves the next job
    before = fleet.succeeded("host2")
    again = fleet.run_job("after-partition")
    assert_same_output(again, clean_run)
    assert fleet.succeeded("host2") > before, fleet.log("host2")[-3000:]
    assert not fleet.result_keys()


def test_a_frozen_host_thawed_after_the_job_drops_its_late_copy(fleet: Fleet, clean_run: JobRun) -> None:
    # given a job under way, when every process of host2 is SIGSTOPped while it holds a chunk (a frozen
    # VM), and SIGCONTed once the job is over
    run = _job_with_host2_faulted(fleet, "frozen", fleet.network.freeze, fleet.network.thaw)
    # then the job completes exactly, host2's chunk having been sent again ...
    assert_same_output(run, clean_run)
    assert _resent_for_lost_holder(run) >= 1, run.manifest()
    # ... and, thawed, host2 finishes its copy and drops it: no result key, nothing in the output changes
    assert wait_until(lambda: "dropped without storing" in fleet.log("host2"), 60, 0.5), fleet.log("host2")[-3000:]
    _wait_no_result_keys(fleet)
    fleet.wait_all_alive()
    before = fleet.succeeded("host2")
    again = fleet.run_job("after-thaw")
    assert_same_output(again, clean_run)
    assert fleet.succeeded("host2") > before


def test_a_slow_host_gets_a_backup_copy_of_its_straggler(fleet: Fleet, clean_run: JobRun) -> None:
    # given host2 capped at 5% of a core (a busy neighbour) while host1 runs at full speed
    host2 = fleet.hosts["host2"]
    fleet.network.throttle(host2, 5)
    try:
        # when a job runs
        started = time.monotonic()
        process, out = fleet.start_job("slow")
        _wait_holding(fleet, "host2")
        # (an operator asking meanwhile sees who holds which chunk, since when, and how often it was sent)
        status = _status_of_newest_job(fleet)
        run = fleet.finish(process, out, started)
    finally:
        fleet.network.unthrottle(host2)
    assert "LEASE AGE" in status and "host2" in status, status
    # then host1 finishes host2's chunk as a backup, and the output is exact
    assert_same_output(run, clean_run)
    assert _resent(run).get("straggler_backup", 0) >= 1, run.manifest()
    assert _resent(run).get("holder_silent", 0) == 0  # a slow holder keeps renewing its lease
    _wait_no_result_keys(fleet)
    fleet.wait_all_alive()


def test_every_host_lost_fails_the_job_naming_the_rows(fleet: Fleet, clean_run: JobRun) -> None:
    # given a job under way on both hosts
    started = time.monotonic()
    process, out = fleet.start_job("all-lost", "--workers-lost-timeout", "10")
    try:
        _wait_holding(fleet, "host1")
        # when both hosts are cut off
        for host in fleet.hosts.values():
            fleet.network.cut(host)
        run = fleet.finish(process, out, started)
    finally:
        for host in fleet.hosts.values():
            fleet.network.heal(host)
    # then the job fails in one clear line naming the rows, instead of waiting forever
    assert run.code == 1, run.stderr[-3000:]
    assert "no live worker" in run.stderr and "rows " in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert not out.exists()
    fleet.wait_all_alive()
    _wait_no_result_keys(fleet)
