"""What `--precision` costs in search quality, on held-out real text: top-10 agreement with float32.

    PYTHONPATH=. .venv/bin/python bench/quant_recall.py [--corpus 2000] [--queries 200] [--model PATH]

Writes a fortunes corpus (`/work/shared/tools/make-fortunes-corpus`, else bench/corpus.py's copy of
it), embeds corpus and queries in one float32 `embedq embed` job (embedded Valkey and local workers),
then quantises exactly as the job's output would be (producer/job/quantize.py, tested equal to
sentence-transformers' `quantize_embeddings`): int8/uint8 calibrated on the corpus rows only, the
queries quantised with the corpus' ranges, as `quantize_queries` does with a manifest. Every 11th text
is a query, the others the corpus, so no query is in the corpus or in the calibration.

For each query, float32 cosine gives the reference top 10; each method's top 10 is compared with it:
"overlap@10" is the mean share of the reference's 10 that the method also returns, "top-1" how often
the best hit is the same.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.corpus import make_corpus  # noqa: E402
from producer.job.quantize import calibration_ranges, dequantize, quantize  # noqa: E402

K = 10
#: Candidates the binary search hands to the rescoring (sentence-transformers' `rescore_multiplier` of 4).
RESCORE = 4 * K


def top_k(scores: np.ndarray, k: int = K) -> np.ndarray:
    """Indices of the k highest scores of each row, best first (ties by index, so runs agree)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def hamming_scores(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """Minus the Hamming distance between packed bit rows (higher is closer)."""
    q = np.unpackbits(queries.view(np.uint8), axis=1).astype(np.int32)
    c = np.unpackbits(corpus.view(np.uint8), axis=1).astype(np.int32)
    # differing bits = |q| + |c| - 2 q.c
    return -(q.sum(1)[:, None] + c.sum(1)[None, :] - 2 * q @ c.T)


def agreement(reference: np.ndarray, found: np.ndarray) -> tuple[float, float]:
    overlap = np.mean([len(set(r) & set(f)) / K for r, f in zip(reference, found, strict=True)])
    top1 = float(np.mean(reference[:, 0] == found[:, 0]))
    return float(overlap), top1


def embed(texts_path: Path, out: Path, model: str | None) -> np.ndarray:
    """float32 rows of `texts_path` from one `embedq embed` job (kept in `out`: a rerun reuses them)."""
    if out.exists():
        return np.load(out)
    argv = [sys.executable, "-m", "producer.cli", "embed", str(texts_path), "-o", str(out), "--no-progress"]
    argv += ["--model", model] if model else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run(argv, check=True, env=env)
    return np.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=int, default=2000, help="corpus texts (default 2000)")
    parser.add_argument("--queries", type=int, default=200, help="held-out query texts (default 200)")
    parser.add_argument("--model", default=None, help="model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "embedq-bench")
    args = parser.parse_args()

    total = args.corpus + args.queries
    step = max(2, total // args.queries)
    source = make_corpus(args.cache, total)
    tag = Path(args.model).name if args.model else "packaged"
    vectors = embed(source, args.cache / f"recall-{total}-{tag}.npy", args.model)
    is_query = np.zeros(total, dtype=bool)
    is_query[step - 1 :: step] = True
    is_query[np.flatnonzero(is_query)[args.queries :]] = False
    queries, corpus = vectors[is_query], vectors[~is_query]

    reference = top_k(cosine(queries, corpus))
    ranges = calibration_ranges([corpus], corpus.shape[1])  # the job's calibration: corpus rows only
    int8_q, int8_c = quantize(queries, "int8", ranges), quantize(corpus, "int8", ranges)
    uint8_q, uint8_c = quantize(queries, "uint8", ranges), quantize(corpus, "uint8", ranges)
    bin_q, bin_c = quantize(queries, "ubinary"), quantize(corpus, "ubinary")

    restored = dequantize(int8_c, "int8", ranges)

    def rescored() -> np.ndarray:
        # Binary search for RESCORE candidates, then the float query against their dequantised int8 rows.
        candidates = top_k(hamming_scores(bin_q, bin_c), RESCORE)
        rows = []
        for query, picked in zip(queries, candidates, strict=True):
            scores = cosine(query[None, :], restored[picked])[0]
            rows.append(picked[np.argsort(-scores, kind="stable")[:K]])
        return np.array(rows)

    methods: dict[str, Callable[[], np.ndarray]] = {
        "int8, cosine of int8 query and rows": lambda: top_k(cosine(int8_q, int8_c)),
        "uint8, cosine of uint8 query and rows": lambda: top_k(cosine(uint8_q, uint8_c)),
        "int8, float query x rows dequantised with the manifest's ranges": lambda: top_k(cosine(queries, restored)),
        "binary, Hamming distance": lambda: top_k(hamming_scores(bin_q, bin_c)),
        f"binary, then {RESCORE} candidates rescored on dequantised int8 rows": rescored,
    }
    model = args.model or "packaged all-MiniLM-L6-v2"
    print(f"{corpus.shape[0]} corpus texts, {queries.shape[0]} held-out queries, {model} (dim {corpus.shape[1]})")
    print("| search | overlap@10 with float32 | same top-1 | bytes per row |")
    print("|---|---:|---:|---:|")
    width = {"int8": int8_c.shape[1], "uint8": uint8_c.shape[1], "binary": bin_c.shape[1]}
    print(f"| float32, cosine (reference) | 1.000 | 1.000 | {corpus.shape[1] * 4} |")
    for name, run in methods.items():
        overlap, top1 = agreement(reference, run())
        size = width[name.split(",")[0]] + (width["int8"] if "rescored" in name else 0)
        print(f"| {name} | {overlap:.3f} | {top1:.3f} | {size} |")


if __name__ == "__main__":
    main()
