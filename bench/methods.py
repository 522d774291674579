"""One in-process embedding method per run, in its own process so that its peak RSS is its own.

    python bench/methods.py METHOD CORPUS.jsonl OUT_PREFIX [--limit N] [--threads T]

Writes OUT_PREFIX.npy (the embeddings of the first rows it did) and OUT_PREFIX.json (rows, seconds
of encoding, seconds of start-up, tokens, padded tokens). Timings exclude the model load, which
is reported apart as start-up; embedq end to end is timed as a whole command by bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.corpus import read_texts  # noqa: E402
from workers.protocol.model_info import resolve_model  # noqa: E402

#: embedq in process, per kept runtime and dtype: `embedq-RUNTIME-DTYPE`.
EMBEDQ_METHODS = (
    "embedq-torch-fp32",
    "embedq-torch-bf16",
    "embedq-openvino-fp32",
    "embedq-openvino-bf16",
    "embedq-onnxruntime-fp32",
)
METHODS = ("per-doc", "fixed-32", "st", "st-pool", "st-onnx", "st-openvino", *EMBEDQ_METHODS)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _hf_batches(texts: list[str], batch: int, max_length: int) -> dict[str, Any]:
    """The common recipe: batches in input order, padded to their longest text, fp32."""
    from transformers import AutoModel, AutoTokenizer

    info = resolve_model("")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    model = AutoModel.from_pretrained(info.path).eval()
    load_s = time.perf_counter() - started
    with torch.inference_mode():  # warm up kernels and allocator outside the timing
        model(**tokenizer([t.strip() for t in texts[:batch]], padding=True, truncation=True, return_tensors="pt"))
    out = np.empty((len(texts), info.dim), dtype=np.float32)
    tokens = padded = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            inputs = tokenizer(
                [t.strip() for t in texts[start : start + batch]],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = model(**inputs).last_hidden_state
            out[start : start + batch] = _mean_pool(hidden, inputs["attention_mask"]).numpy()
            tokens += int(inputs["attention_mask"].sum())
            padded += int(inputs["attention_mask"].numel())
    return {
        "embeddings": out,
        "seconds": time.perf_counter() - started,
        "load_s": load_s,
        "tokens": tokens,
        "padded_tokens": padded,
        "dtype": "fp32",
    }


def _st(texts: list[str], processes: int, backend: str = "torch") -> dict[str, Any]:
    """sentence-transformers as its users run it: load, `encode` with batch 32 (its ONNX/OpenVINO backends
    export the folder on load, through optimum; OpenVINO then runs its default precision, bf16 on CPUs with it)."""
    from sentence_transformers import SentenceTransformer

    info = resolve_model("")
    started = time.perf_counter()
    model = SentenceTransformer(str(info.path), device="cpu", backend=backend)
    model.encode(texts[:32], batch_size=32)  # warm-up
    pool = model.start_multi_process_pool(["cpu"] * processes) if processes > 1 else None
    load_s = time.perf_counter() - started
    try:
        started = time.perf_counter()
        if pool is not None:
            out = model.encode(texts, batch_size=32, pool=pool, convert_to_numpy=True)
        else:
            out = model.encode(texts, batch_size=32, convert_to_numpy=True)
        seconds = time.perf_counter() - started
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)
    dtype = "fp32"
    if backend == "openvino":
        request = model[0].auto_model.request  # a CompiledModel or an InferRequest, by optimum-intel version
        compiled = request.get_compiled_model() if hasattr(request, "get_compiled_model") else request
        dtype = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        dtype = {"f32": "fp32", "<Type: 'float32'>": "fp32", "<Type: 'bfloat16'>": "bf16"}.get(dtype, dtype)
    return {"embeddings": np.asarray(out, dtype=np.float32), "seconds": seconds, "load_s": load_s, "dtype": dtype}


def _embedq_inproc(texts: list[str], runtime: str, dtype: str) -> dict[str, Any]:
    """The embedq encoder in this process, with the defaults a worker uses: the queue-free baseline.

    Start-up is a load from the conversion cache (bench/run.py converts first, untimed)."""
    from workers.encoder import Encoder
    from workers.protocol.config import Settings
    from workers.runtime import bound_native_memory

    bound_native_memory()  # as a worker child does: the same allocator and kernel-cache settings
    info = resolve_model("")
    started = time.perf_counter()
    encoder = Encoder.load(info, "cpu", runtime=runtime, dtype=dtype)
    encoder.encode(texts[:32], dtype=dtype)  # warm-up
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    result = encoder.encode(
        texts, pooling=info.pooling, max_length=info.max_length, dtype=dtype, batch_tokens=Settings().batch_tokens
    )
    return {
        "embeddings": result.embeddings,
        "seconds": time.perf_counter() - started,
        "load_s": load_s,
        "tokens": result.tokens,
        "padded_tokens": result.padded_tokens,
        "dtype": result.dtype,
    }


def run(method: str, texts: list[str]) -> dict[str, Any]:
    max_length = resolve_model("").max_length
    if method == "per-doc":
        return _hf_batches(texts, 1, max_length)
    if method == "fixed-32":
        return _hf_batches(texts, 32, max_length)
    if method == "st":
        return _st(texts, 1)
    if method == "st-pool":
        return _st(texts, 2)
    if method in ("st-onnx", "st-openvino"):
        return _st(texts, 1, method.split("-", 1)[1])
    _, runtime, dtype = method.split("-")
    return _embedq_inproc(texts, runtime, dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=0, help="only the first N texts (the slow methods)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = read_texts(args.corpus)
    if args.limit:
        texts = texts[: args.limit]
    result = run(args.method, texts)
    np.save(args.out.with_suffix(".npy"), result.pop("embeddings"))
    result["rows"] = len(texts)
    args.out.with_suffix(".json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
