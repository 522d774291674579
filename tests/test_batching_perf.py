"""Performance properties that can be checked without a clock: padding, bf16 accuracy, threads.

Speed itself is measured by `make bench` (bench/run.py), never asserted here: the machine is shared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from producer.cli.main import build_parser, default_workers
from producer.job.chunk_plan import auto_chunk_rows
from workers.encoder.batching import pack_by_tokens, padded_tokens
from workers.protocol.config import Settings
from workers.protocol.model_info import default_model_path

SAMPLE = Path(__file__).resolve().parent.parent / "producer" / "samples" / "sample.jsonl"


def _sample_texts(limit: int | None = None) -> list[str]:
    with open(SAMPLE, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    return texts[:limit] if limit else texts


def test_default_budget_and_chunk_size_pad_at_most_five_percent_on_the_sample() -> None:
    from transformers import AutoTokenizer

    # given the sample corpus cut into chunks of the size `embedq embed` picks for it here, as the producer does
    assert build_parser().parse_args(["embed", "in.jsonl", "-o", "out.npy"]).chunk_size is None  # auto
    chunk_rows = auto_chunk_rows(len(_sample_texts()), default_workers())
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    ids = tokenizer([t.strip() for t in _sample_texts()], truncation=True, max_length=256)["input_ids"]
    lengths = [len(row) for row in ids]
    # when each chunk is packed under the default token budget
    real = padded = 0
    for start in range(0, len(lengths), chunk_rows):
        chunk = lengths[start : start + chunk_rows]
        batches = pack_by_tokens(chunk, Settings().batch_tokens)
        real += sum(chunk)
        padded += padded_tokens(chunk, batches)
    # then the model computes at most 5% more tokens than the texts hold
    assert padded <= 1.05 * real, f"padded/real = {padded / real:.3f}"


def test_packing_beats_greedy_filling_on_mixed_lengths() -> None:
    # given lengths like a chunk of short texts with a long tail
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.clip(rng.lognormal(3.4, 0.8, 512), 3, 256)]
    # when packed with no per-batch overhead, and with a large one
    exact = pack_by_tokens(lengths, 2048, overhead_tokens=0)
    coarse = pack_by_tokens(lengths, 2048, overhead_tokens=10_000)
    # then no overhead means no padding at all, and a large overhead means few, full batches
    assert padded_tokens(lengths, exact) == sum(lengths)
    assert len(coarse) < len(exact)
    assert all(len(b) * max(lengths[i] for i in b) <= 2048 for b in coarse)


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 64])
@pytest.mark.parametrize("children", [1, 2, 3, 4, 16])
def test_threads_per_child_never_exceed_cores(cores: int, children: int) -> None:
    from workers.runtime import threads_per_child

    # given a pool of `children` on a machine of `cores`
    settings = Settings(concurrency=children).replace(pool_concurrency=children)
    # when each child picks its torch threads
    threads = threads_per_child(settings, cores=cores)
    # then the pool never runs more threads than cores (but each child gets one at least)
    assert threads >= 1
    assert children * threads <= max(cores, children)


def test_embedq_worker_says_what_it_chose_and_it_fits_the_cores() -> None:
    from producer.cli.main import worker_argv

    # given `embedq worker` with every default, on this machine
    args = build_parser().parse_args(["worker", "--broker", "redis://127.0.0.1:1/0"])
    # when it works out its command line
    command, env, line = worker_argv(args, Settings(broker_url=args.broker))
    # then the line names the children and threads it chose, and together they fit the cores
    cores = len(os.sched_getaffinity(0))
    children = default_workers()
    threads = max(1, cores // children)
    assert f"{children} children x {threads} torch threads" in line
    assert command[command.index("--concurrency") + 1] == str(children)
    assert children * threads <= cores


def test_bf16_autocast_matches_fp32_on_the_sample() -> None:
    import torch

    from workers.encoder import Encoder, configure_threads, cpu_has_bf16
    from workers.protocol.model_info import resolve_model

    # given the packaged model and a slice of the sample corpus
    configure_threads(min(2, len(os.sched_getaffinity(0))))
    info = resolve_model("")
    encoder = Encoder.load(info, "cpu")
    # Emulated bf16 (no native bf16) runs the sample 5-10x slower than fp32: a third of it keeps this test from
    # being the suite's longest there; test_equivalence holds bf16 to the same bar on a few hundred sentences.
    texts = _sample_texts(96 if cpu_has_bf16() else 32)
    # when embedded in fp32, under bf16 autocast (weights stay fp32), and with auto
    exact = encoder.encode(texts, pooling=info.pooling, dtype="fp32")
    fast = encoder.encode(texts, pooling=info.pooling, dtype="bf16")
    auto = encoder.encode(texts[:8], pooling=info.pooling, dtype="auto")
    # then auto takes bf16 only on a CPU with native bf16 (AVX512-BF16 or AMX; elsewhere it is emulated, slower)
    assert auto.dtype == ("bf16" if cpu_has_bf16() else "fp32")
    # and bf16 keeps fp32 weights, every vector pointing the same way within 1e-4
    assert fast.dtype == "bf16"
    assert next(encoder.model.parameters()).dtype == torch.float32
    cos = (exact.embeddings * fast.embeddings).sum(1) / (
        np.linalg.norm(exact.embeddings, axis=1) * np.linalg.norm(fast.embeddings, axis=1)
    )
    assert cos.min() >= 0.9999, f"min cosine {cos.min():.6f}"
