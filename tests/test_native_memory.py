"""A worker child's memory stays flat: native caches bounded before any forward pass (bound_native_memory), and
every dtype's buffers brought to their high-water mark before its first real batch (Encoder warm-up)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from workers import runtime
from workers.encoder import Encoder
from workers.protocol.model_info import resolve_model


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_bounds_ideep_and_onednn_caches(clean_env: pytest.MonkeyPatch) -> None:
    # given a child's environment with neither cache set
    # when the child bounds its native memory
    runtime.bound_native_memory()
    # then torch's ideep matmul cache (the per-shape growth under bf16) and oneDNN's kernel cache are small
    assert os.environ["LRU_CACHE_CAPACITY"] == str(runtime.IDEEP_CACHE_CAPACITY)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(runtime.ONEDNN_CACHE_CAPACITY)


def test_a_users_own_cache_sizes_win(clean_env: pytest.MonkeyPatch) -> None:
    # given a user who sized both caches themselves
    clean_env.setenv("LRU_CACHE_CAPACITY", "1024")
    clean_env.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    # when the child bounds its native memory, then their values stay
    runtime.bound_native_memory()
    assert os.environ["LRU_CACHE_CAPACITY"] == "1024"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"


def test_a_dtype_a_job_asks_for_is_warmed_up_once_per_thread_before_its_first_batch(tiny_bert: Path) -> None:
    # given a worker's encoder warmed up at start for its own dtype, fp32, with every forward pass recorded
    # (a pass over nothing but padding is a warm-up: real rows start with [CLS])
    encoder = Encoder.load(resolve_model(str(tiny_bert)), "cpu", runtime="torch", dtype="fp32")
    encoder.warm_up(64, "fp32")
    backend = encoder.backend("bf16")
    calls: list[tuple[str, bool]] = []
    real_embed = backend.embed

    def recorded(input_ids: np.ndarray, mask: np.ndarray, pooling: str, dtype: str, *rest: Any) -> np.ndarray:
        calls.append((dtype, bool((input_ids == encoder.pad_id).all())))
        return real_embed(input_ids, mask, pooling, dtype, *rest)

    backend.embed = recorded  # type: ignore[method-assign]
    texts = ["a short sentence", "another, longer sentence about the weather in spring"]

    # when a job asks for bf16 (a runtime compiles it on first use: its buffers would otherwise grow in steps)
    encoder.encode(texts, dtype="bf16", batch_tokens=64)
    # then bf16 is warmed up before its first real batch ...
    assert calls[0] == ("bf16", True) and all(not warm for _, warm in calls[1:]), calls
    # ... and only once: fp32, warmed at start, and bf16 again run real batches only
    calls.clear()
    encoder.encode(texts, dtype="bf16", batch_tokens=64)
    encoder.encode(texts, dtype="fp32", batch_tokens=64)
    assert calls and not any(warm for _, warm in calls), calls
    # a larger batch budget, or another thread (OpenVINO keeps an infer request and its memory per thread),
    # is warmed up again
    calls.clear()
    encoder.encode(texts, dtype="bf16", batch_tokens=128)
    assert calls[0] == ("bf16", True), calls
    calls.clear()
    other = threading.Thread(target=encoder.encode, args=(texts,), kwargs={"dtype": "fp32", "batch_tokens": 64})
    other.start()
    other.join(timeout=60)
    assert calls[0] == ("fp32", True) and all(not warm for _, warm in calls[1:]), calls


def test_a_warm_up_that_runs_out_of_gpu_memory_is_given_up_once_and_the_batches_still_run(tiny_bert: Path) -> None:
    # given an encoder whose forward pass runs out of memory past 64 tokens (injected: no GPU here), with a
    # reference from an encoder without the fault
    info = resolve_model(str(tiny_bert))
    texts = ["a short sentence", "another, longer sentence about the weather in spring"]
    reference = Encoder.load(info, "cpu").encode(texts, batch_tokens=512).embeddings
    encoder = Encoder.load(info, "cpu")
    backend = encoder.backend("fp32")
    real_embed = backend.embed
    warm_ups: list[int] = []

    def small_memory(input_ids: np.ndarray, *rest: Any) -> np.ndarray:
        if (input_ids == encoder.pad_id).all():
            warm_ups.append(input_ids.size)
        if input_ids.size > 64:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_embed(input_ids, *rest)

    backend.embed = small_memory  # type: ignore[method-assign]
    # when a request's budget is too big to warm up
    rows = encoder.encode(texts, batch_tokens=512).embeddings
    encoder.encode(texts, batch_tokens=512)
    # then the warm-up was tried once, and the job's own batches ran, exactly
    assert warm_ups == [512]
    np.testing.assert_allclose(rows, reference, atol=1e-6)

    # and any other failure of a warm-up is not hidden
    def broken(input_ids: np.ndarray, *rest: Any) -> np.ndarray:
        raise RuntimeError("the model's weights are corrupt")

    backend.embed = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="corrupt"):
        encoder.encode(texts, batch_tokens=1024)
