"""Long texts as overlapping token windows (`--long chunk-mean` and `--long chunks`).

The encoder tokenizes a chunk once, with truncation (`Encoder.tokenize`), exactly as under `truncate`.
Here only the texts that reached the limit are tokenized again, without special tokens and without
truncation; those really longer than `max_length - specials` content tokens are cut by
`long_docs.window_spans` (a quarter of a window shared by neighbours), and each window is wrapped in the
tokenizer's own special tokens ([CLS] ... [SEP] for BERT), so that it is a text the model has seen the
like of. Every text that fits keeps its very row. The rows then go through the same length-sorted
token-budget batches as any other, and `Windows.combine` turns the pooled rows into the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.protocol.errors import ConfigError, ModelError
from workers.protocol.long_docs import CHUNK_MEAN, CHUNKS, LONG_POLICIES, window_spans


@dataclass(frozen=True)
class Windows:
    """What to run for a chunk under a windowing policy, and how each run row maps back to its text."""

    #: Token ids to run, grouped by text in input order (a fitting text: its one row; a long one: its windows).
    rows: list[list[int]]
    #: int32 (len(rows), 4), the columns of `long_docs.WINDOW_COLUMNS`: text, window, token_start, token_end.
    table: np.ndarray
    #: Texts in the chunk.
    texts: int
    #: Texts longer than the model's length, and the windows they became.
    split: int
    windows: int

    def combine(self, pooled: np.ndarray, policy: str) -> np.ndarray:
        """The output rows from the pooled, not yet normalised, rows: one per window under `chunks`; under
        `chunk-mean` one per text, a split text's windows averaged with their token counts as weights (in
        float64), a fitting text's row copied as it is."""
        if policy == CHUNKS:
            return pooled
        if policy != CHUNK_MEAN:
            raise ConfigError(f"long {policy!r}: choose one of {', '.join(LONG_POLICIES)}")
        counts = np.bincount(self.table[:, 0], minlength=self.texts)
        firsts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        output = pooled[firsts].copy()
        tokens = (self.table[:, 3] - self.table[:, 2]).astype(np.float64)
        for text in np.flatnonzero(counts > 1):
            rows = slice(int(firsts[text]), int(firsts[text] + counts[text]))
            weights = tokens[rows]
            output[text] = (pooled[rows].astype(np.float64) * weights[:, None]).sum(0) / weights.sum()
        return output


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text (BERT: [CLS] and [SEP]; RoBERTa: <s> and </s>)."""
    plain = tokenizer.encode(["a"], special=False)[0][0]
    wrapped = tokenizer.encode(["a"])[0][0]
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start : start + len(plain)] == plain:
            return list(wrapped[:start]), list(wrapped[start + len(plain) :])
    raise ModelError("the tokenizer's special tokens cannot be told apart from a text's: use --long truncate")


def plan_windows(encoder: Any, texts: Sequence[str], ids: list[list[int]], max_length: int) -> Windows:
    """The rows to run for `texts`, whose truncated token ids (`Encoder.tokenize`) are `ids`."""
    with encoder._tokenizer_lock:  # a fast tokenizer is not safe to share between threads
        prefix, suffix = special_tokens(encoder.tokenizer)
    specials = len(prefix) + len(suffix)
    size = max_length - specials
    if size < 1:
        raise ConfigError(f"max_length {max_length}: leaves no token for text between the {specials} special tokens")
    # Only a text whose truncated row reached the limit can be longer than the limit.
    candidates = [i for i, row in enumerate(ids) if len(row) >= max_length]
    content: dict[int, list[int]] = {}
    if candidates:
        with encoder._tokenizer_lock:
            # Stripped, as Encoder.tokenize does; untruncated, without special tokens: the text's own tokens.
            encoded, _ = encoder.tokenizer.encode([texts[i].strip() for i in candidates], special=False)
        content = {i: row for i, row in zip(candidates, encoded, strict=True) if len(row) > size}
    rows: list[list[int]] = []
    table: list[tuple[int, int, int, int]] = []
    windows = 0
    for index, row in enumerate(ids):
        tokens = content.get(index)
        if tokens is None:
            rows.append(row)
            table.append((index, 0, 0, max(0, len(row) - specials)))
            continue
        spans = window_spans(len(tokens), size)
        windows += len(spans)
        for number, (start, end) in enumerate(spans):
            rows.append([*prefix, *tokens[start:end], *suffix])
            table.append((index, number, start, end))
        first = rows[-len(spans)]
        if first != row:
            # Window 0 must be what truncation keeps; a tokenizer for which it is not would be windowed wrongly.
            raise ModelError(
                f"record {index}: its first window differs from its truncated tokens (this tokenizer adds tokens "
                "that depend on the text); use --long truncate"
            )
    return Windows(rows, np.asarray(table, dtype=np.int32).reshape(-1, 4), len(ids), len(content), windows)
