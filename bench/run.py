"""embedq against the alternatives, on one corpus, in one process tree: `make bench`.

    python bench/run.py [DOCS] [--large N] [--out bench/results.md]

Every method runs in its own child process (so its peak RSS is its own) on the same fortunes
corpus, and every ratio compares numbers taken in this one run: the machine may be shared and
noisy, ratios within a run are what count. Prints a markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from bench.corpus import make_corpus, read_texts  # noqa: E402
from bench.large import WarmWorkers  # noqa: E402
from bench.measure import BertShape, cosines, matmul_gflops, run_sampled  # noqa: E402
from workers.protocol.model_info import resolve_model  # noqa: E402

MB = 2**20


@dataclass
class Row:
    """One line of the table."""

    name: str
    rows: int
    seconds: float
    tokens: int
    padded: int
    dtype: str
    cos: np.ndarray | None
    peak_rss: int
    wall_s: float
    startup_s: float
    flops: float
    note: str = ""

    @property
    def docs_per_s(self) -> float:
        return self.rows / self.seconds


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def token_lengths(texts: list[str], model_path: str, max_length: int) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer([t.strip() for t in texts], truncation=True, max_length=max_length)["input_ids"]
    return [len(row) for row in ids]


def st_padded(texts: list[str], lengths: list[int], batch: int = 32) -> int:
    """Padded tokens of sentence-transformers' own batching: sorted by character length, batches of 32."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return sum(len(b) * max(lengths[i] for i in b) for b in (order[s : s + batch] for s in range(0, len(order), batch)))


def run_method(method: str, corpus: Path, work: Path, limit: int = 0) -> tuple[dict[str, object], np.ndarray, int]:
    out = work / method
    argv = [sys.executable, str(ROOT / "bench" / "methods.py"), method, str(corpus), str(out)]
    if limit:
        argv += ["--limit", str(limit)]
    print(f"bench: {method}{f' (first {limit} docs)' if limit else ''} ...", file=sys.stderr, flush=True)
    timed = run_sampled(argv, log=work / f"{method}.log")
    if timed.returncode != 0:
        raise SystemExit(f"bench: {method} failed (exit {timed.returncode}):\n{timed.output[-2000:]}")
    result = json.loads(out.with_suffix(".json").read_text())
    return result, np.load(out.with_suffix(".npy")), timed.peak_rss


def run_embedq(corpus: Path, work: Path, dtype: str, name: str) -> tuple[dict[str, object], np.ndarray, float, int]:
    """The real `embedq embed` command, embedded default (its own Valkey and workers): whole wall time."""
    output = work / f"{name}.npy"
    env = {k: v for k, v in os.environ.items() if k != "EMBEDQ_BROKER_URL"}
    argv = [
        sys.executable,
        "-m",
        "producer.cli",
        "embed",
        str(corpus),
        "-o",
        str(output),
        "--dtype",
        dtype,
        "--no-progress",
    ]
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    timed = run_sampled(argv, env={**env, "PYTHONPATH": str(ROOT)}, log=work / f"{name}.log")
    if timed.returncode != 0:
        raise SystemExit(f"bench: {name} failed (exit {timed.returncode}):\n{timed.output[-2000:]}")
    manifest = json.loads(Path(f"{output}.manifest.json").read_text())
    return manifest, np.load(output), timed.wall_s, timed.peak_rss


def fmt_row(row: Row, st_docs_per_s: float, roofline: dict[str, float | None]) -> str:
    real_tps = row.tokens / row.seconds
    peak = roofline[row.dtype]
    frac = f"{row.flops / row.seconds / (peak * 1e9):.1%}" if peak else "n/a"
    cos = f"{row.cos.min():.6f} | {row.cos.mean():.6f}" if row.cos is not None else "ref | ref"
    return (
        f"| {row.name} | {row.docs_per_s:,.1f} | {real_tps:,.0f} | {row.padded / row.tokens:.2f} | "
        f"{row.docs_per_s / st_docs_per_s:.2f}x | {frac} | {cos} | {row.peak_rss / MB:,.0f} | "
        f"{row.wall_s:.1f} ({row.startup_s:.1f}) |{(' ' + row.note) if row.note else ''}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("docs", type=int, nargs="?", default=3000, help="corpus size (default 3000)")
    parser.add_argument(
        "--large",
        type=int,
        default=0,
        help="also embed N docs against a Valkey the bench "
        "starts, reporting producer peak RSS and Redis peak used_memory (e.g. 100000)",
    )
    parser.add_argument("--per-doc-limit", type=int, default=100, help="docs timed for the per-document loop")
    parser.add_argument("--fixed-limit", type=int, default=1000, help="docs timed for fixed batches of 32")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "embedq-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    args = parser.parse_args()

    import torch

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    corpus = make_corpus(args.cache, args.docs)
    texts = read_texts(corpus)
    info = resolve_model("")
    lengths = token_lengths(texts, info.path, info.max_length)
    shape = BertShape.of(info.path)
    from workers.encoder import cpu_has_bf16

    # Without native bf16 (AVX2-only CPUs) a bf16 matmul is emulated at well under 1 GFLOP/s: no roofline
    # worth dividing by, and each measurement would take a minute.
    native_bf16 = cpu_has_bf16()
    roofline: dict[str, float | None] = {
        "fp32": matmul_gflops("fp32"),
        "bf16": matmul_gflops("bf16") if native_bf16 else None,
    }
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))

    rows: list[Row] = []
    st_result, reference, st_rss = run_method("st", corpus, work)

    def add(name: str, result: dict[str, object], emb: np.ndarray, rss: int, note: str = "") -> None:
        n = emb.shape[0]
        tokens = sum(lengths[:n])
        rows.append(
            Row(
                name,
                n,
                float(result["seconds"]),
                tokens,
                int(result.get("padded_tokens") or tokens),  # type: ignore[call-overload]
                str(result["dtype"]),
                cosines(emb, reference[:n]),
                rss,
                float(result["seconds"]) + float(result["load_s"]),
                float(result["load_s"]),  # type: ignore[arg-type]
                shape.flops(lengths[:n]),
                note,
            )
        )

    per_doc_n = min(args.per_doc_limit, len(texts))
    fixed_n = min(args.fixed_limit, len(texts))
    for method, limit in (("per-doc", per_doc_n), ("fixed-32", fixed_n)):
        result, emb, rss = run_method(method, corpus, work, limit if limit < len(texts) else 0)
        note = f"timed on the first {emb.shape[0]} docs" if emb.shape[0] < len(texts) else ""
        add(
            {
                "per-doc": "1. per-document loop (HF, fp32)",
                "fixed-32": "2. fixed batches of 32, input order (HF, fp32)",
            }[method],
            result,
            emb,
            rss,
            note,
        )
    st_row = Row(
        "3. sentence-transformers encode (fp32, batch 32)",
        len(texts),
        float(st_result["seconds"]),  # type: ignore[arg-type]
        sum(lengths),
        st_padded(texts, lengths),
        "fp32",
        None,
        st_rss,
        float(st_result["seconds"]) + float(st_result["load_s"]),
        float(st_result["load_s"]),  # type: ignore[arg-type]
        shape.flops(lengths),
    )
    rows.append(st_row)
    result, emb, rss = run_method("st-pool", corpus, work)
    add("4. sentence-transformers multi-process pool (2 processes)", result, emb, rss)
    rows[-1].padded = st_padded(texts, lengths)

    inproc: dict[str, Row] = {}
    for dtype in ("fp32", "bf16"):
        result, emb, rss = run_method(f"embedq-inproc-{dtype}", corpus, work)
        add(f"embedq encoder in-process ({dtype}, {cores} threads, no queue)", result, emb, rss)
        inproc[dtype] = rows[-1]

    e2e: dict[str, Row] = {}
    for number, dtype in ((5, "fp32"), (6, "bf16")):
        manifest, emb, wall, rss = run_embedq(corpus, work, dtype, f"embedq-{dtype}")
        row = Row(
            f"{number}. embedq end to end, Celery + Redis ({dtype}, whole command)",
            emb.shape[0],
            wall,
            int(manifest["tokens"]),
            int(manifest["padded_tokens"]),
            dtype,
            cosines(emb, reference),
            rss,
            wall,
            0.0,  # filled in below, once the same job has run on warm workers
            shape.flops(lengths),
        )
        rows.append(row)
        e2e[dtype] = row

    # The same jobs on workers that are already up: the queue's own cost, start-up set apart.
    warm_s: dict[str, float] = {}
    busy_s: dict[str, float] = {}
    large_line = ""
    print("bench: warm workers (own Valkey + embedq worker) ...", file=sys.stderr, flush=True)
    with WarmWorkers(work, args.cache) as warm:
        for dtype in ("fp32", "bf16"):
            warm_s[dtype], emb, busy_s[dtype] = warm.embed_rows(corpus, dtype, f"warm-{dtype}")
            assert emb.shape == reference.shape
            e2e[dtype].startup_s = e2e[dtype].wall_s - warm_s[dtype]
        if args.large:
            large_line = warm.large(args.large)

    from producer.cli.main import default_workers

    # The machine may be shared: the roofline is the best of a measurement before and one after.
    roofline = {dtype: max(gflops, matmul_gflops(dtype)) if gflops else None for dtype, gflops in roofline.items()}

    children = default_workers()
    st_dps = st_row.docs_per_s
    header = (
        "| method | docs/s | real tokens/s | padded/real | x ST fp32 | roofline | cos min | cos mean | "
        "peak RSS MB | wall s (start-up s) | note |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [
        f"embedq benchmark, {started}: {cpu_model()}, {cores} cores, torch {torch.__version__}, "
        f"model {info.name}, {len(texts):,} fortunes docs ({sum(lengths):,} tokens, median "
        f"{int(np.median(lengths))}).",
        "",
        f"Matmul roofline (2048x2048, {cores} threads, best of before and after): fp32 {roofline['fp32']:.0f} GFLOP/s, "
        + (f"bf16 {roofline['bf16']:.0f} GFLOP/s" if roofline["bf16"] else "bf16 n/a (no native bf16: emulated)")
        + "; useful FLOPs = 2 x weights x real tokens + attention.",
        "",
        header,
    ]
    lines += [fmt_row(row, st_dps, roofline) for row in rows]
    lines.append("")
    for dtype in ("fp32", "bf16"):
        lines.append(
            f"- queue overhead {dtype}: `embedq embed --broker` on warm workers {warm_s[dtype]:.1f} s vs the same "
            f"encoder in one process {inproc[dtype].seconds:.1f} s = {warm_s[dtype] / inproc[dtype].seconds - 1:+.1%}"
            f"; its {children} children spent {busy_s[dtype]:.1f} s encoding of {children} x {warm_s[dtype]:.1f} s "
            f"({1 - busy_s[dtype] / (children * warm_s[dtype]):.0%} of worker time outside encode: producer start-up, "
            f"queue, tail); start-up of the whole command (row {5 if dtype == 'fp32' else 6} less warm) "
            f"{e2e[dtype].startup_s:.1f} s"
        )
    lines.append(
        "- docs/s of rows 1-4 and the in-process rows exclude model load (start-up, in brackets); "
        "rows 5-6 are the whole `embedq embed` command, start-up included."
    )
    if large_line:
        lines += ["", large_line]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.write_text(table)
    print(f"bench: written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
