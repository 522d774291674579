"""A progress line on a terminal (docs/s and ETA), and nothing at all when output is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int | None, stream: TextIO = sys.stderr, enabled: bool | None = None) -> None:
        self.total = total
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self.done = 0
        self._last_draw = 0.0

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= 0.2:
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            bar = "#" * int(fraction * 30)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_text = f"ETA {eta:5.0f} s" if eta != float("inf") else "ETA   ?"
            line = f"\r[{bar:<30}] {self.done}/{self.total} docs  {rate:7.1f} docs/s  {eta_text}"
        else:
            line = f"\r{self.done} docs  {rate:7.1f} docs/s"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
