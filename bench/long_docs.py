"""What `--long` costs, in-process on the packaged MiniLM (torch fp32, 2 threads): tokens, windows, seconds.

Documents are runs of 12 sample texts (all over the 256-token limit). Run:
`PYTHONPATH=. .venv/bin/python bench/long_docs.py`; each policy runs twice (the second is warm).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from workers.encoder import Encoder
from workers.protocol.model_info import resolve_model

SAMPLE = Path(__file__).resolve().parent.parent / "producer/samples/sample.jsonl"


def main() -> None:
    texts = [json.loads(line)["text"] for line in SAMPLE.open(encoding="utf-8")]
    docs = [" ".join(texts[i : i + 12]) for i in range(0, len(texts) - 12, 3)][:60]
    encoder = Encoder.load(resolve_model(""), "cpu", runtime="torch", threads=2)
    print(f"max_length {encoder.info.max_length}, {len(docs)} docs")
    for policy in ("truncate", "chunk-mean", "chunks") * 2:
        started = time.perf_counter()
        result = encoder.encode(docs, long=policy)
        print(
            f"{policy:10s} rows {result.embeddings.shape[0]:4d} tokens {result.tokens:6d} "
            f"padded {result.padded_tokens:6d} truncated {result.truncated} split {result.split} "
            f"windows {result.windows} {time.perf_counter() - started:.2f} s"
        )
    cut = encoder.encode(docs).embeddings
    mean = encoder.encode(docs, long="chunk-mean").embeddings
    cosines = np.sum(cut * mean, axis=1)
    print(f"cos(truncate, chunk-mean): min {cosines.min():.4f} median {np.median(cosines):.4f}")


if __name__ == "__main__":
    main()
