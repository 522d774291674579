"""bound_native_memory: the caches that made a long bf16 job's worker child grow are bounded before any forward pass."""

from __future__ import annotations

import os

import pytest

from workers import runtime


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
