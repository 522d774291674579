"""Token-budget batching: sort by length, then pack so that rows x longest row stays under a budget.

Padding a batch costs as much compute as real tokens, and every forward pass has a fixed cost
besides (measured on all-MiniLM-L6-v2, one thread: about 7 ms in fp32, 13 ms under bf16 autocast,
the price of 30 to 190 tokens). Sorting first makes neighbours alike in length; among the ways
to cut the sorted rows into batches under the budget, `pack_by_tokens` picks the one with the
fewest padded tokens plus `overhead_tokens` per batch. Greedy filling (cut when the next row
would break the budget) padded 1.20x on 256-text chunks of fortunes; this cut pads 1.04x.
The budget keeps activation memory flat whether texts are short or long.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: What one more forward pass costs, in padded tokens; see the module docstring for the measurement.
OVERHEAD_TOKENS = 64


def pack_by_tokens(
    lengths: Sequence[int], batch_tokens: int, overhead_tokens: int = OVERHEAD_TOKENS
) -> list[list[int]]:
    """Group row indices into batches whose padded size (rows x longest) is at most `batch_tokens`.

    Rows come out sorted by length, each batch a run of neighbours; a row longer than the budget
    gets a batch of its own. Among such cuts this one minimises padded tokens + overhead per batch
    (dynamic programming over the sorted lengths, O(rows x rows per batch) in numpy).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    if n == 0:
        return []
    sorted_lengths = np.fromiter((max(1, lengths[i]) for i in order), dtype=np.int64, count=n)
    # best[j]: the cheapest cut of the first j sorted rows; cut_at[j]: where its last batch starts.
    best = np.zeros(n + 1, dtype=np.int64)
    cut_at = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        longest = int(sorted_lengths[j - 1])  # sorted ascending: the last row of a batch is its longest
        first = max(0, j - max(1, batch_tokens // longest))
        starts = np.arange(first, j)
        costs = best[first:j] + (j - starts) * longest + overhead_tokens
        k = int(np.argmin(costs))
        best[j] = costs[k]
        cut_at[j] = first + k
    batches: list[list[int]] = []
    j = n
    while j > 0:
        start = int(cut_at[j])
        batches.append(order[start:j])
        j = start
    batches.reverse()
    return batches


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens the model computes for these batches, padding included."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
