"""How many documents go into each chunk: full chunks first, shrinking ones at the tail (guided self-scheduling).

With fixed chunks the job ends when the last full chunk ends: one child finishes it while the others
idle. Guided self-scheduling (Polychronopoulos and Kuck, 1987) sizes each chunk from what is left,
`remaining / tail_split`, capped at --chunk-size and floored at `min_rows`, so the last chunks are
small and the children end together. The plan depends only on the input's line count and the
options (both part of the job id), so a rerun of the same command cuts the same chunks and reuses
finished ones by index. Without a line count (stdin) every chunk is full.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

#: Tail chunks never go below this many rows: a smaller chunk packs worse into token batches and pays
#: its queue round trips for too little work. A --chunk-size at or below it keeps every chunk full.
MIN_TAIL_ROWS = 64


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk sizes for a job of `total` rows (None: unknown), at most `max_rows` each."""

    max_rows: int
    total: int | None = None
    #: Chunks the remaining rows are split into (about 2 per worker child); 0 keeps every chunk full.
    tail_split: int = 0
    min_rows: int = MIN_TAIL_ROWS

    def size(self, done: int) -> int:
        """Rows of the chunk that starts after `done` rows."""
        if not self.total or self.tail_split <= 0 or self.max_rows <= self.min_rows:
            return self.max_rows
        remaining = max(self.total - done, 0)
        guided = -(-remaining // self.tail_split)  # ceil: the last chunks are never empty
        return max(self.min_rows, min(self.max_rows, guided))

    def sizes(self) -> Iterator[int]:
        """Every chunk's size in order, for a known `total` (what a job of exactly `total` rows cuts)."""
        done = 0
        while self.total is not None and done < self.total:
            size = min(self.size(done), self.total - done)
            yield size
            done += size
