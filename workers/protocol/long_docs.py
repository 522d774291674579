"""The long-document policy both sides speak: what a worker does with a text over the model's length.

- `truncate` (the default): keep the first tokens, count the text as truncated (what embedq always did).
- `chunk-mean`: split the text into overlapping token windows, embed each, and average them into one
  row, weighted by each window's token count (vLLM's chunked processing aggregates the same way).
- `chunks`: one output row per window; the worker stores the window table below next to the matrix.

Window table (int32, one row per stored embedding row, in document order):
`document` (the text's index within its chunk), `window` (0, 1, ... within the text), `token_start`
and `token_end` (the window's span in the text's own tokens, special tokens not counted, end exclusive).
"""

from __future__ import annotations

TRUNCATE = "truncate"
CHUNK_MEAN = "chunk-mean"
CHUNKS = "chunks"
LONG_POLICIES = (TRUNCATE, CHUNK_MEAN, CHUNKS)

#: Columns of the window table, in order.
WINDOW_COLUMNS = ("document", "window", "token_start", "token_end")


def overlap_of(window_tokens: int) -> int:
    """Tokens two neighbouring windows share: a quarter of the window, so that a sentence cut at one window's
    edge is whole in the next (0 for windows under 4 tokens)."""
    return window_tokens // 4


def window_spans(length: int, window_tokens: int) -> list[tuple[int, int]]:
    """[start, end) spans covering `length` tokens with windows of `window_tokens`, each starting
    `window_tokens - overlap_of(window_tokens)` after the previous; the last one ends at `length` (and may be
    shorter). A text that fits is one span, (0, length)."""
    if window_tokens < 1:
        raise ValueError(f"window of {window_tokens} tokens: must be at least 1")
    step = window_tokens - overlap_of(window_tokens)
    spans = [(0, min(length, window_tokens))]
    while spans[-1][1] < length:
        start = spans[-1][0] + step
        spans.append((start, min(length, start + window_tokens)))
    return spans
