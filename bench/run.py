"""embedq against the alternatives, on one corpus, in one process tree: `make bench`.

    python bench/run.py [DOCS] [--large N] [--out bench/results.md]     (DOCS: 6000 held-out fortunes)

Every method runs in its own child process (so its peak RSS is its own) on the same fortunes
corpus, and every ratio compares numbers taken in this one run: the machine may be shared and
noisy, ratios within a run are what count. Prints a markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
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
from workers.protocol.errors import EmbedqError  # noqa: E402
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


#: The instruction sets that decide matmul speed, strongest first (a hypervisor may hide some).
MATMUL_ISA = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpu_model() -> str:
    """The CPU's name, family/model and best matmul instruction set: "AMD EPYC" alone names CPUs that differ 2x."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor tells
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    isa = [flag for flag in MATMUL_ISA if flag in flags]
    if "cpu family" not in fields or "model" not in fields:
        return name
    return f"{name} (family {fields['cpu family']} model {fields['model']}, {'+'.join(isa) or 'no AVX2'})"


def token_lengths(texts: list[str], model_path: str, max_length: int) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer([t.strip() for t in texts], truncation=True, max_length=max_length)["input_ids"]
    return [len(row) for row in ids]


def st_padded(texts: list[str], lengths: list[int], batch: int = 32) -> int:
    """Padded tokens of sentence-transformers' own batching: sorted by character length, batches of 32."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return sum(len(b) * max(lengths[i] for i in b) for b in (order[s : s + batch] for s in range(0, len(order), batch)))


#: The peers' own environment (`make bench` builds it): sentence-transformers' ONNX and OpenVINO backends need
#: optimum-onnx (transformers < 4.58) and optimum-intel (transformers < 5.6), which embedq's transformers is past.
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


def run_method(
    method: str, corpus: Path, work: Path, limit: int = 0, python: str = sys.executable
) -> tuple[dict[str, object], np.ndarray, int] | str:
    """Run one bench/methods.py method in its own process: (result, embeddings, peak RSS), or why it failed."""
    out = work / method
    argv = [python, str(ROOT / "bench" / "methods.py"), method, str(corpus), str(out)]
    if limit:
        argv += ["--limit", str(limit)]
    print(f"bench: {method}{f' (first {limit} docs)' if limit else ''} ...", file=sys.stderr, flush=True)
    timed = run_sampled(argv, log=work / f"{method}.log")
    if timed.returncode != 0:
        last = [line for line in timed.output.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return f"failed (exit {timed.returncode}): {last[0][:160]}"
    result = json.loads(out.with_suffix(".json").read_text())
    result["script_wall_s"] = timed.wall_s  # the whole script: interpreter, imports, load, warm-up, encode, save
    return result, np.load(out.with_suffix(".npy")), timed.peak_rss


def run_embedq(
    corpus: Path, work: Path, dtype: str, name: str, runtime: str = "auto"
) -> tuple[dict[str, object], np.ndarray, float, int]:
    """The real `embedq embed` command, embedded default (its own Valkey and workers): whole wall time."""
    output = work / f"{name}.npy"
    env = {k: v for k, v in os.environ.items() if k != "EMBEDQ_BROKER_URL"}
    argv = [sys.executable, "-m", "producer.cli", "embed", str(corpus), "-o", str(output)]
    argv += ["--dtype", dtype, "--runtime", runtime, "--no-progress"]
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    timed = run_sampled(argv, env={**env, "PYTHONPATH": str(ROOT)}, log=work / f"{name}.log")
    if timed.returncode != 0:
        raise SystemExit(f"bench: {name} failed (exit {timed.returncode}):\n{timed.output[-2000:]}")
    manifest = json.loads(Path(f"{output}.manifest.json").read_text())
    return manifest, np.load(output), timed.wall_s, timed.peak_rss


def convert_models() -> None:
    """Convert the model for every runtime once, untimed: start-up columns then show a load from the cache."""
    code = (
        "from workers.encoder import Encoder; from workers.protocol.model_info import resolve_model\n"
        "for runtime in ('openvino', 'onnxruntime'): Encoder.load(resolve_model(''), 'cpu', runtime=runtime)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


HEADER = (
    "| method | docs/s | x ST fp32 | cos min | cos mean | padded/real tokens | start-up s | matmul roof | "
    "peak RSS MB | note |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def fmt_row(row: Row, st_docs_per_s: float, roofline: dict[str, float | None]) -> str:
    peak = roofline.get(row.dtype)
    frac = f"{row.flops / row.seconds / (peak * 1e9):.1%}" if peak else "n/a"
    cos = f"{row.cos.min():.6f} | {row.cos.mean():.6f}" if row.cos is not None else "ref | ref"
    return (
        f"| {row.name} | {row.docs_per_s:,.1f} | {row.docs_per_s / st_docs_per_s:.2f}x | {cos} | "
        f"{row.padded / row.tokens:.2f} | {row.startup_s:.1f} | {frac} | {row.peak_rss / MB:,.0f} | {row.note} |"
    )


def whole_script_lines(script_walls: dict[str, float], e2e: dict[str, Row], docs: int) -> list[str]:
    """The judged ratios: whole `embedq embed` commands against whole sentence-transformers scripts (each timed
    from exec to exit: interpreter, imports, model load or export, warm-up, encode), from this one run."""
    peers = {
        name: wall
        for name, wall in script_walls.items()
        if name.startswith("sentence-transformers encode") or 'backend="openvino"' in name
    }
    if not peers:
        return []
    lines = ["Whole scripts against whole commands (exec to exit, start-up included on both sides):", ""]
    lines += ["| command | wall s | docs/s | " + " | ".join(f"x {name}" for name in peers) + " |"]
    lines += ["|---|---:|---:|" + "---:|" * len(peers)]
    for name, wall in peers.items():
        lines.append(f"| {name} script | {wall:.1f} | {docs / wall:,.1f} |" + " |" * len(peers))
    for dtype, row in e2e.items():
        ratios = " | ".join(f"{wall / row.wall_s:.2f}x" for wall in peers.values())
        lines.append(f"| `embedq embed` {dtype} | {row.wall_s:.1f} | {docs / row.wall_s:,.1f} | {ratios} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("docs", type=int, nargs="?", default=6000, help="corpus size (default 6000)")
    parser.add_argument(
        "--large",
        type=int,
        default=0,
        help="also embed N docs against a Valkey the bench starts, reporting producer peak RSS and Redis peak "
        "used_memory (e.g. 100000)",
    )
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "embedq-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    args = parser.parse_args()

    import torch

    from workers.encoder import choose_runtime, cpu_has_bf16

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    corpus = make_corpus(args.cache, args.docs)
    texts = read_texts(corpus)
    info = resolve_model("")
    lengths = token_lengths(texts, info.path, info.max_length)
    shape = BertShape.of(info.path)
    # Without native bf16 (AVX2-only CPUs) a bf16 matmul is emulated at well under 1 GFLOP/s: no roofline
    # worth dividing by, and each measurement would take a minute.
    native_bf16 = cpu_has_bf16()
    roofline: dict[str, float | None] = {
        "fp32": matmul_gflops("fp32"),
        "bf16": matmul_gflops("bf16") if native_bf16 else None,
    }
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))
    print("bench: converting the model for each runtime (untimed, cached) ...", file=sys.stderr, flush=True)
    convert_models()

    rows: list[Row] = []
    missing: list[str] = []
    script_walls: dict[str, float] = {}
    reference_run = run_method("st", corpus, work)
    if isinstance(reference_run, str):
        raise SystemExit(f"bench: sentence-transformers {reference_run}")
    st_result, reference, st_rss = reference_run
    st_padded_tokens = st_padded(texts, lengths)

    def add(name: str, run: tuple[dict[str, object], np.ndarray, int] | str, padded: int | None = None) -> None:
        if isinstance(run, str):
            missing.append(f"| {name} | | | | | | | | | {run} |")
            return
        result, emb, rss = run
        n = emb.shape[0]
        if "script_wall_s" in result:
            script_walls[name] = float(result["script_wall_s"])  # type: ignore[arg-type]
        tokens = sum(lengths[:n])
        rows.append(
            Row(
                name,
                n,
                float(result["seconds"]),  # type: ignore[arg-type]
                tokens,
                padded or int(result.get("padded_tokens") or tokens),  # type: ignore[call-overload]
                str(result["dtype"]),
                cosines(emb, reference[:n]) if rows else None,
                rss,
                float(result["seconds"]) + float(result["load_s"]),  # type: ignore[arg-type]
                float(result["load_s"]),  # type: ignore[arg-type]
                shape.flops(lengths[:n]),
            )
        )

    add("sentence-transformers encode (fp32, batch 32)", reference_run, st_padded_tokens)
    add("sentence-transformers multi-process pool (2 processes)", run_method("st-pool", corpus, work), st_padded_tokens)
    for backend, label in (("onnx", 'backend="onnx" (fp32)'), ("openvino", 'backend="openvino" (its default)')):
        name = f"sentence-transformers {label}"
        if PEERS_PYTHON.exists():
            add(name, run_method(f"st-{backend}", corpus, work, python=str(PEERS_PYTHON)), st_padded_tokens)
        else:
            add(name, "not installed: optimum needs transformers < 5.6 (`make bench` builds .venv-peers for it)")
    for runtime in ("torch", "openvino", "onnxruntime"):
        for dtype in ("fp32", "bf16"):
            try:
                choose_runtime(runtime, "cpu", dtype)
            except EmbedqError as error:
                if runtime == "torch" or dtype == "fp32":
                    raise
                missing.append(f"| embedq in-process {runtime} {dtype} | | | | | | | | | refused: {error} |")
                continue
            if dtype == "bf16" and not native_bf16:
                missing.append(f"| embedq in-process {runtime} bf16 | | | | | | | | | skipped: no native bf16 |")
                continue
            name = f"embedq in-process {runtime} {dtype} ({cores} threads)"
            add(name, run_method(f"embedq-{runtime}-{dtype}", corpus, work))

    e2e: dict[str, Row] = {}
    auto = {dtype: choose_runtime("auto", "cpu", dtype) for dtype in ("fp32", "bf16")}
    # Without native bf16 a bf16 command runs emulated, several times slower than fp32 (and says so): not a peer.
    command_dtypes = ("fp32", "bf16") if native_bf16 else ("fp32",)
    if not native_bf16:
        missing.append("| `embedq embed` whole command, bf16 | | | | | | | | | skipped: no native bf16 |")
    for dtype in command_dtypes:
        manifest, emb, wall, rss = run_embedq(corpus, work, dtype, f"embedq-{dtype}")
        row = Row(
            f"`embedq embed` whole command, {dtype} (runtime auto = {auto[dtype]})",
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
            "start-up included in docs/s",
        )
        rows.append(row)
        e2e[dtype] = row

    # The same jobs on workers that are already up: the command's start-up is its wall less this.
    large_line = ""
    print("bench: warm workers (own Valkey + embedq worker) ...", file=sys.stderr, flush=True)
    with WarmWorkers(work, args.cache) as warm:
        for dtype in command_dtypes:
            warm_s, emb, _ = warm.embed_rows(corpus, dtype, f"warm-{dtype}")
            assert emb.shape == reference.shape
            e2e[dtype].startup_s = max(0.0, e2e[dtype].wall_s - warm_s)
        if args.large:
            large_line = warm.large(args.large)

    # The machine may be shared: the roofline is the best of a measurement before and one after.
    roofline = {dtype: max(gflops, matmul_gflops(dtype)) if gflops else None for dtype, gflops in roofline.items()}
    st_dps = rows[0].docs_per_s
    lines = [
        f"embedq benchmark, {started}: {cpu_model()}, {cores} cores, torch {torch.__version__}, "
        f"model {info.name}, {len(texts):,} fortunes docs ({sum(lengths):,} tokens, median "
        f"{int(np.median(lengths))}); command: `make bench` (python bench/run.py {args.docs}).",
        "",
        f"Matmul roof (2048x2048, {cores} threads, best of before and after): fp32 {roofline['fp32']:.0f} GFLOP/s, "
        + (f"bf16 {roofline['bf16']:.0f} GFLOP/s" if roofline["bf16"] else "bf16 n/a (no native bf16: emulated)")
        + "; useful FLOPs = 2 x weights x real tokens + attention. In-process and sentence-transformers docs/s "
        "exclude start-up (model load from the conversion cache, shown apart); the whole commands include it.",
        "",
        HEADER,
        *(fmt_row(row, st_dps, roofline) for row in rows),
        *missing,
    ]
    lines += ["", *whole_script_lines(script_walls, e2e, len(texts))]
    if large_line:
        lines += ["", large_line]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.write_text(table)
    print(f"bench: written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
