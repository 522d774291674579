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

#: --chunk-size when it cannot be worked out from the corpus (stdin: no line count).
DEFAULT_CHUNK_ROWS = 512
#: Chunks per pool child that `auto_chunk_rows` aims at, and its bounds. Why larger chunks: a worker sorts
#: and packs one chunk at a time, so a larger chunk packs fuller, better-matched batches. In process (OpenVINO
#: bf16, one thread, Intel Xeon with AMX, 3,072 fortunes) chunks of 256 / 512 / 1,024 / 3,072 rows took
#: 10.7 / 10.0 / 9.4 / 8.9 s (199 / 141 / 111 / 88 batches). Why at most `total / (3 x children)`: the job ends
#: with its last chunk, so each child needs a few to end together: 3,000 docs on 2 children in chunks of
#: 1,024 (3 chunks: one child gets two) took 7.3 s against 6.2-6.4 s in chunks of 500-512; 6,000 docs in
#: chunks of 1,024 took 9.3-9.5 s against 9.8-10.0 s in chunks of 512 (whole `embedq embed --dtype bf16`,
#: alternating runs). Bounded below by the fixed default (smaller chunks pack worse: 1.057x padding on the
#: 1,000-text sample in chunks of 256, 1.04x in 512), and above, so that a chunk lost with its host costs
#: little to redo.
CHUNKS_PER_CHILD = 3
AUTO_MIN_ROWS, AUTO_MAX_ROWS = DEFAULT_CHUNK_ROWS, 2048


def auto_chunk_rows(total: int | None, children: int) -> int:
    """--chunk-size auto: about `CHUNKS_PER_CHILD` chunks per pool child, within the bounds above.

    `total` is the corpus's line count (None when unknown: DEFAULT_CHUNK_ROWS). The size is part of the job's
    identity, so it depends only on the corpus and the child count, never on timing; a rerun with another child
    count takes the size its earlier run cut (producer/job/spec.py `with_earlier_chunk_rows`).
    """
    if not total:
        return DEFAULT_CHUNK_ROWS
    wanted = -(-total // (CHUNKS_PER_CHILD * max(1, children)))  # ceil
    return max(AUTO_MIN_ROWS, min(AUTO_MAX_ROWS, wanted))


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
