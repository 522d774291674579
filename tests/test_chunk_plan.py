"""The chunk plan: full chunks, then chunks that shrink towards the end (guided self-scheduling)."""

from __future__ import annotations

import pytest

from producer.job.chunk_plan import (
    AUTO_MAX_ROWS,
    AUTO_MIN_ROWS,
    CHUNKS_PER_CHILD,
    DEFAULT_CHUNK_ROWS,
    ChunkPlan,
    auto_chunk_rows,
)
from producer.job.dispatcher import SPECULATION_MULTIPLIER, Holding, straggler_threshold_s
from producer.job.record import RUNNING, JobRecord
from producer.job.status import job_status


def test_chunks_are_full_until_the_tail_then_shrink_and_cover_every_row_once() -> None:
    plan = ChunkPlan(max_rows=512, total=6000, tail_split=4, min_rows=64)
    sizes = list(plan.sizes())
    assert sum(sizes) == 6000
    assert sizes[:8] == [512] * 8  # until a quarter of what is left is less than a full chunk
    tail = sizes[8:]
    assert tail == sorted(tail, reverse=True)  # shrinking, never growing again
    assert tail[0] < 512 and min(tail[:-1]) == 64  # floored at min_rows (the last takes what is left)
    # no tail chunk is longer than a quarter of what was left when it was cut
    done = sum(sizes[:8])
    for size in tail:
        assert size <= max(64, -(-(6000 - done) // 4))
        done += size


@pytest.mark.parametrize("children", [1, 2, 3, 8])
@pytest.mark.parametrize("total", [1, 700, 3000, 6000, 20_000, 1_000_000])
def test_auto_chunk_size_gives_each_child_about_three_chunks_within_bounds(total: int, children: int) -> None:
    rows = auto_chunk_rows(total, children)
    assert AUTO_MIN_ROWS <= rows <= AUTO_MAX_ROWS
    chunks = -(-total // rows)
    if AUTO_MIN_ROWS < rows < AUTO_MAX_ROWS:
        # inside the bounds: exactly enough chunks for CHUNKS_PER_CHILD each (the last may be short)
        assert chunks == CHUNKS_PER_CHILD * children or chunks == CHUNKS_PER_CHILD * children - 1
    elif rows == AUTO_MAX_ROWS:
        assert chunks >= CHUNKS_PER_CHILD * children  # a large corpus: more chunks, never larger ones
    assert auto_chunk_rows(total, children) == rows  # the same corpus and children: the same job id


def test_auto_chunk_size_without_a_line_count_is_the_fixed_default() -> None:
    assert auto_chunk_rows(None, 2) == DEFAULT_CHUNK_ROWS == 512
    assert auto_chunk_rows(0, 2) == DEFAULT_CHUNK_ROWS
    assert auto_chunk_rows(6000, 2) == 1000 and auto_chunk_rows(3000, 2) == 512  # never below the default


def test_the_same_input_and_options_cut_the_same_chunks_wherever_a_run_starts_reading() -> None:
    # A rerun reuses finished chunks by index: each size depends only on the rows before it.
    plan = ChunkPlan(300, 5000, 4, 32)
    sizes = list(plan.sizes())
    assert list(ChunkPlan(300, 5000, 4, 32).sizes()) == sizes
    done = 0
    for size in sizes[:-1]:
        assert ChunkPlan(300, 5000, 4, 32).size(done) == size
        done += size
    assert sizes != list(ChunkPlan(300, 5000, 2, 32).sizes())  # hence tail_split is part of the job id


@pytest.mark.parametrize(
    ("plan", "why"),
    [
        (ChunkPlan(512, None, 4), "stdin: the total is unknown"),
        (ChunkPlan(512, 6000, 0), "no tail split asked for"),
        (ChunkPlan(32, 6000, 4, min_rows=64), "--chunk-size at or below the floor"),
    ],
)
def test_chunks_stay_full_when_the_plan_cannot_or_need_not_shrink(plan: ChunkPlan, why: str) -> None:
    assert {plan.size(done) for done in range(0, 6000, 97)} == {plan.max_rows}, why


def test_a_tail_chunk_is_a_straggler_only_against_the_time_of_its_own_size() -> None:
    # Backups compare a chunk with the median time per row times its rows: a full chunk that takes as
    # long as full chunks do is not a straggler although the small tail chunks finish much sooner.
    per_row_s = 0.01
    full, tail = 512 * per_row_s, 64 * per_row_s
    assert straggler_threshold_s(full) > full
    assert straggler_threshold_s(full) == pytest.approx(SPECULATION_MULTIPLIER * full)
    assert straggler_threshold_s(tail) < full  # a tail chunk running as long as a full one is late


def test_only_a_copy_whose_lease_is_being_renewed_counts_as_running_for_a_backup() -> None:
    # A child that dies on its chunk (a poison text, the OOM killer) leaves a lease that is never renewed
    # until Redis expires it; a backup copy of it would only kill another child (seen in CI: 5 deaths, not 3).
    interval_s = 2.0
    started = {"pid": 10, "started": 1000.0, "renewals": 0}
    holding = Holding(seen=0.0, record=started, renewed=0.0)
    for now in (1.0, 3.0, 9.0):
        holding = holding.update(now, dict(started))
        assert not holding.renewing(now, interval_s), now
    # its holder renews: running, and timed from when it was first seen
    holding = holding.update(10.0, {**started, "renewals": 1})
    assert holding.renewing(10.0, interval_s) and holding.seen == 0.0
    assert holding.renewing(14.0, interval_s) and not holding.renewing(14.5, interval_s)  # then it went silent
    # a redelivery to a new child starts a new holding, timed from then
    again = holding.update(20.0, {"pid": 11, "started": 1019.5, "renewals": 0})
    assert again.seen == 20.0 and not again.renewing(20.0, interval_s)


def test_status_of_a_running_job_counts_the_chunks_of_its_plan() -> None:
    record = JobRecord(
        "in.jsonl", "out.npy", "tiny", RUNNING, 1000.0, 6000, 512, done_chunks=8, tail_split=4, min_chunk_rows=64
    )
    status = job_status("j", record, now=1010.0)
    assert status.total_chunks == len(list(ChunkPlan(512, 6000, 4, 64).sizes())) == 19
    assert status.docs_done == 8 * 512
