"""Prompts and Matryoshka cuts inside the encoder, done exactly as sentence-transformers does them.

- A prompt is prepended to every text (`prompt + text`, no separator added) before tokenizing.
- With the Pooling module's `include_prompt=False`, the prompt's tokens stay in attention but not in the
  pooled vector: sentence-transformers tokenizes the prompt alone, takes its length less a trailing special
  token (BERT's [SEP]), and zeroes that many leading positions of the pooling mask ([CLS] included).
- `dimensions` keeps the first N components of the pooled vector; normalising comes after the cut, so
  cut vectors are unit length (OpenAI's and sentence-transformers' `truncate_dim` + normalisation).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def prompt_length(tokenizer: Any, prompt: str, max_length: int) -> int:
    """Tokens of `prompt` that pooling leaves out: its ids with special tokens, less a trailing special one."""
    ids = tokenizer.encode([prompt], max_length)[0][0]
    length = len(ids)
    if ids and ids[-1] in tokenizer.special_ids:
        length -= 1
    return length


def pooling_mask(attention_mask: np.ndarray, skip_tokens: int) -> np.ndarray | None:
    """The attention mask with its first `skip_tokens` positions zeroed (right padding), or None for none."""
    if skip_tokens <= 0:
        return None
    mask = attention_mask.copy()
    mask[:, :skip_tokens] = 0
    return mask


def cut(embeddings: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` components of each row (a contiguous copy), or the rows as they are."""
    if dimensions is None or dimensions >= embeddings.shape[1]:
        return embeddings
    return np.ascontiguousarray(embeddings[:, :dimensions])
