"""Where chunk embeddings wait for the producer: raw float32 bytes in Redis with a TTL, or .npy files.

Both stores share one interface and one contract test (tests/test_store_contract.py). Writes are
idempotent, keyed by (job, chunk): a chunk computed twice is stored once. Under `--long chunks` a chunk's
matrix has one row per window, and its window table (workers/protocol/long_docs.py) is stored with it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from workers.protocol.errors import ConfigError, ResultsRefused
from workers.protocol.keys import Keys, connect


@dataclass(frozen=True)
class StoredChunk:
    """One chunk's result: its float32 matrix and, when one was stored, its int32 window table."""

    array: np.ndarray
    windows: np.ndarray | None = None


class ResultStore(ABC):
    """Put, get and delete one float32 matrix (and an optional window table) per (job, chunk)."""

    @abstractmethod
    def put(self, job: str, chunk: int, array: np.ndarray, windows: np.ndarray | None = None) -> None:
        """Store `array` for (job, chunk), with its window table if given (one row per row of `array`),
        replacing whatever was there; matrix and table are seen together or not at all."""

    @abstractmethod
    def get(self, job: str, chunk: int) -> np.ndarray | None:
        """The stored matrix, or None when there is none (never stored, deleted or expired)."""

    @abstractmethod
    def get_chunk(self, job: str, chunk: int) -> StoredChunk | None:
        """The stored matrix with its window table (None when stored without), or None when there is none."""

    @abstractmethod
    def delete(self, job: str, chunk: int) -> None:
        """Forget (job, chunk); deleting what is not there is fine."""

    @abstractmethod
    def delete_job(self, job: str) -> None:
        """Forget every chunk of `job`."""


def decode_result(fields: Mapping[Any, Any]) -> np.ndarray | None:
    """The matrix of one chunk's result hash (HGETALL of `Keys.result`), or None when there is none."""
    if not fields:
        return None
    rows, dim = int(fields[b"rows"]), int(fields[b"dim"])
    return np.frombuffer(fields[b"data"], dtype="<f4").reshape(rows, dim)


def decode_chunk(fields: Mapping[Any, Any]) -> StoredChunk | None:
    """`decode_result` with the window table, when the hash holds one."""
    array = decode_result(fields)
    if array is None:
        return None
    table = fields.get(b"windows")
    windows = None if table is None else np.frombuffer(table, dtype="<i4").reshape(array.shape[0], -1)
    return StoredChunk(array, windows)


class RedisStore(ResultStore):
    """A hash per chunk: rows, dim and the raw little-endian float32 bytes, expiring after `ttl_s`."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s

    def put(self, job: str, chunk: int, array: np.ndarray, windows: np.ndarray | None = None) -> None:
        data = np.ascontiguousarray(array, dtype="<f4")
        key = self.keys.result(job, chunk)
        table = None if windows is None else _window_table(windows, data.shape[0]).tobytes()
        with self.client.pipeline(transaction=True) as pipe:  # one MULTI: matrix and table are seen together
            pipe.delete(key)  # a put replaces the whole hash, a window table included
            pipe.hset(key, mapping={"rows": data.shape[0], "dim": data.shape[1], "data": data.tobytes()})
            if table is not None:
                pipe.hset(key, "windows", table)
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def get(self, job: str, chunk: int) -> np.ndarray | None:
        # A client made with decode_responses would hand back str and corrupt the bytes: insist on bytes.
        return decode_result(self.client.hgetall(self.keys.result(job, chunk)))  # type: ignore[arg-type]

    def get_chunk(self, job: str, chunk: int) -> StoredChunk | None:
        return decode_chunk(self.client.hgetall(self.keys.result(job, chunk)))  # type: ignore[arg-type]

    def delete(self, job: str, chunk: int) -> None:
        self.client.delete(self.keys.result(job, chunk))

    def delete_job(self, job: str) -> None:
        pattern = self.keys.result(job, 0)[:-1] + "*"
        for key in self.client.scan_iter(match=pattern, count=500):
            self.client.delete(key)


_JOB_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


class DiskStore(ResultStore):
    """One `.npy` shard per chunk under `root/job/`; written to a temp name, then renamed atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, job: str, chunk: int) -> Path:
        # The job id comes from a task message: it names one folder under the root, never a path elsewhere.
        if not _JOB_NAME.fullmatch(job):
            raise ResultsRefused(f"job id {job[:80]!r} is not a plain name ([A-Za-z0-9_.-], not starting with '.')")
        return self.root / job / f"chunk-{int(chunk):07d}.npy"

    @staticmethod
    def _table_path(path: Path) -> Path:
        return path.with_name(path.stem + ".windows.npy")

    @staticmethod
    def _save(path: Path, array: np.ndarray) -> None:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, array)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def put(self, job: str, chunk: int, array: np.ndarray, windows: np.ndarray | None = None) -> None:
        path = self._path(job, chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = np.ascontiguousarray(array, dtype="<f4")
        # The table goes first: the matrix file is what says that a result is there.
        if windows is not None:
            self._save(self._table_path(path), _window_table(windows, data.shape[0]))
        else:
            self._table_path(path).unlink(missing_ok=True)
        self._save(path, data)

    def get(self, job: str, chunk: int) -> np.ndarray | None:
        try:
            return np.load(self._path(job, chunk), allow_pickle=False)
        except FileNotFoundError:
            return None

    def get_chunk(self, job: str, chunk: int) -> StoredChunk | None:
        array = self.get(job, chunk)
        if array is None:
            return None
        try:
            windows = np.load(self._table_path(self._path(job, chunk)), allow_pickle=False)
        except FileNotFoundError:
            windows = None
        return StoredChunk(array, windows)

    def delete(self, job: str, chunk: int) -> None:
        path = self._path(job, chunk)
        path.unlink(missing_ok=True)
        self._table_path(path).unlink(missing_ok=True)

    def delete_job(self, job: str) -> None:
        shutil.rmtree(self.root / job, ignore_errors=True)


def _window_table(windows: np.ndarray, rows: int) -> np.ndarray:
    """`windows` as contiguous little-endian int32, one row per matrix row (ValueError otherwise)."""
    table = np.ascontiguousarray(windows, dtype="<i4")
    if table.ndim != 2 or table.shape[0] != rows:
        raise ValueError(f"window table of shape {table.shape}: expected one row per each of the {rows} rows")
    return table


def parse_store_spec(spec: str) -> tuple[str, str]:
    """`redis` or `disk:PATH` -> (kind, path); anything else is a ConfigError."""
    if spec == "redis":
        return "redis", ""
    if spec.startswith("disk:") and len(spec) > len("disk:"):
        return "disk", spec[len("disk:") :]
    raise ConfigError(f"--results {spec!r}: use redis or disk:PATH")


def confined(path: str, root: str) -> Path:
    """`path` resolved, when it lies under `root` (resolved too); ResultsRefused in one line otherwise."""
    if not root:
        raise ResultsRefused(
            f"results 'disk:{path}' refused: this worker writes disk results only under the folder it was "
            "started with (EMBEDQ_DISK_RESULTS_ROOT), and none was set; use --results redis, or start the "
            "worker with EMBEDQ_DISK_RESULTS_ROOT=FOLDER"
        )
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        raise ResultsRefused(
            f"results 'disk:{path}' refused: {resolved} is outside this worker's EMBEDQ_DISK_RESULTS_ROOT {base}"
        )
    return resolved


def open_store(spec: str, *, redis_url: str, key_prefix: str, ttl_s: int, disk_root: str | None = None) -> ResultStore:
    """The store `spec` names. With `disk_root` (a worker), disk results must lie under it (see `confined`)."""
    kind, path = parse_store_spec(spec)
    if kind == "disk":
        return DiskStore(path if disk_root is None else confined(path, disk_root))
    return RedisStore(connect(redis_url), Keys(key_prefix), ttl_s)
