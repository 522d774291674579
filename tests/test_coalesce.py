"""The gateway's dynamic batching: concurrent small requests share one embed call, each gets its own rows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from producer.serve.coalesce import Coalescer


class Recorder:
    """An embed function whose row for a text is [its length, the sum of its code points]: traceable rows."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.variants: list[object] = []
        self.fail = fail

    async def __call__(self, texts: list[str], timeout_s: float, variant: object = ()) -> tuple[np.ndarray, int]:
        self.calls.append(texts)
        self.variants.append(variant)
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("the workers said no")
        return np.array([[float(len(t)), float(sum(map(ord, t)))] for t in texts], dtype=np.float32), 10 * len(texts)


def expected(texts: list[str]) -> np.ndarray:
    return np.array([[float(len(t)), float(sum(map(ord, t)))] for t in texts], dtype=np.float32)


def test_concurrent_small_requests_share_batches_and_each_gets_its_own_rows() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder, batch_texts=8, max_request_texts=3)
    requests = [[f"request {i} text {j}" for j in range(1 + i % 3)] for i in range(12)]

    async def run() -> list[tuple[np.ndarray, int]]:
        return await asyncio.gather(*(coalescer.embed(texts, 5.0) for texts in requests))

    answers = asyncio.run(run())
    assert len(recorder.calls) < len(requests)  # batched
    assert sorted(t for call in recorder.calls for t in call) == sorted(t for r in requests for t in r)
    for texts, (rows, tokens) in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(rows, expected(texts))
        assert tokens > 0
    assert sum(tokens for _, tokens in answers) == pytest.approx(10 * sum(map(len, requests)), abs=len(requests))


def test_a_large_request_goes_alone_and_a_failure_reaches_every_caller_of_its_batch() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder, batch_texts=8, max_request_texts=3)
    big = [f"big {j}" for j in range(5)]
    rows, tokens = asyncio.run(coalescer.embed(big, 5.0))
    assert recorder.calls == [big] and tokens == 50
    np.testing.assert_array_equal(rows, expected(big))

    failing = Coalescer(Recorder(fail=True), batch_texts=8, max_request_texts=3)

    async def run() -> list[object]:
        return await asyncio.gather(*(failing.embed([f"t{i}"], 5.0) for i in range(4)), return_exceptions=True)

    assert all(isinstance(answer, RuntimeError) for answer in asyncio.run(run()))


def test_requests_with_another_prompt_or_width_never_share_a_batch() -> None:
    # given small concurrent requests for two variants (say two prompt names)
    recorder = Recorder()
    coalescer = Coalescer(recorder, batch_texts=8, max_request_texts=3)
    variants = [("query", None), ("doc", 16)]

    async def run() -> list[tuple[np.ndarray, int]]:
        return await asyncio.gather(*(coalescer.embed([f"t{i}"], 5.0, variants[i % 2]) for i in range(6)))

    # when they are coalesced
    answers = asyncio.run(run())
    # then each call carries one variant's texts only, and every caller still gets its own row
    assert sorted(map(str, recorder.variants)) == sorted(map(str, variants))
    for call, variant in zip(recorder.calls, recorder.variants, strict=True):
        assert {int(t[1:]) % 2 for t in call} == {variants.index(variant)}  # type: ignore[arg-type]
    for i, (rows, _) in enumerate(answers):
        np.testing.assert_array_equal(rows, expected([f"t{i}"]))
