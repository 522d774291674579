"""What the benchmark measures besides time: process-tree RSS, the matmul roofline, FLOPs, cosines."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(root: int) -> int:
    """RSS summed over `root` and all its descendants (shared pages counted in each: an upper bound)."""
    tree = _children()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss_bytes(pid)
        stack.extend(tree.get(pid, []))
    return total


class PeakSampler:
    """Samples a value every `interval_s` in a thread and keeps the largest seen."""

    def __init__(self, sample: object, interval_s: float = 0.2) -> None:
        self.sample = sample
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            # A sample that fails (the process just exited) is skipped.
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, int(self.sample()))  # type: ignore[operator]
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Timed:
    wall_s: float
    peak_rss: int
    returncode: int
    output: str


def run_sampled(
    argv: Sequence[str], *, env: dict[str, str] | None = None, log: Path | None = None, sample_pid_rss: bool = False
) -> Timed:
    """Run a command, timing its whole wall and sampling the peak RSS of its process tree
    (or of the process alone with `sample_pid_rss`, e.g. the producer without its workers)."""
    started = time.perf_counter()
    process = subprocess.Popen(list(argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sample = (lambda: rss_bytes(process.pid)) if sample_pid_rss else (lambda: tree_rss_bytes(process.pid))
    with PeakSampler(sample) as sampler:
        output, _ = process.communicate()
    wall = time.perf_counter() - started
    if log is not None:
        log.write_text(output)
    return Timed(wall, sampler.peak, process.returncode, output)


def matmul_gflops(dtype: str, size: int = 2048, seconds: float = 2.0) -> float:
    """Measured GFLOP/s of a size x size matmul in this process (all its threads), the best of a few runs."""
    import torch

    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(size, size).to(kind)
    b = torch.randn(size, size).to(kind)
    torch.matmul(a, b)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
        if time.perf_counter() > deadline:
            break
    return 2 * size**3 / best / 1e9


@dataclass(frozen=True)
class BertShape:
    layers: int
    hidden: int
    intermediate: int

    @classmethod
    def of(cls, model_path: str) -> BertShape:
        import json

        config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
        hidden = int(config.get("hidden_size") or config.get("dim"))
        return cls(
            int(config.get("num_hidden_layers") or config.get("n_layers")),
            hidden,
            int(config.get("intermediate_size") or config.get("hidden_dim") or 4 * hidden),
        )

    def flops(self, lengths: Sequence[int]) -> float:
        """Useful FLOPs of a forward over texts of these token lengths (no padding): the matmuls of
        every layer (2 x weights per token) plus attention scores and mixing (4 x L^2 x hidden)."""
        per_token = 2 * self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.intermediate)
        arr = np.asarray(lengths, dtype=np.float64)
        return float(per_token * arr.sum() + 4 * self.layers * self.hidden * (arr**2).sum())


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two equally shaped matrices, in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
