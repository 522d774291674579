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

from workers.protocol.errors import ConfigError

TRUNCATE = "truncate"
CHUNK_MEAN = "chunk-mean"
CHUNKS = "chunks"
LONG_POLICIES = (TRUNCATE, CHUNK_MEAN, CHUNKS)

#: What a request that gets one vector per text may ask for (the Python clients, the HTTP gateway): `chunks`
#: makes several rows per text, which only `embedq embed` to a Parquet file can hold.
ONE_ROW_POLICIES = (TRUNCATE, CHUNK_MEAN)

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


class LongPolicyUnsupported(ConfigError):
    """Raised when a request asks for a long-document policy it cannot get: unknown, `chunks` (several rows per
    text, where a request gets one vector per text), or windows together with a prompt."""


def check_request_long(long: str, prompt: str | None) -> None:
    """Refuse, before anything is sent, a `long` policy a request (one vector back per text) cannot get as asked.

    `prompt` is the prompt text the request resolved to: windows take no prompt yet (as `embedq embed --long`).
    """
    if long == CHUNKS:
        raise LongPolicyUnsupported(
            "long='chunks' makes one row per window, but a request gets one vector per text: use "
            "long='chunk-mean', or `embedq embed --long chunks` to a .parquet file"
        )
    if long not in ONE_ROW_POLICIES:
        raise LongPolicyUnsupported(f"long={long!r:.40}: choose one of {', '.join(ONE_ROW_POLICIES)}")
    if long != TRUNCATE and prompt:
        raise LongPolicyUnsupported(
            f"long={long!r} with a prompt: windows take no prompt yet; use long='truncate', or prompt='' to "
            "embed without one"
        )
