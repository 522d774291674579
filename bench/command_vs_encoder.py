"""The whole `embedq embed` command against the same encoder in one process, measured in one run.

    python bench/command_vs_encoder.py [--docs 6000] [--dtype fp32] [--repeat 1] [-- EXTRA EMBED FLAGS]

In-process: bench/methods.py embedq-inproc-<dtype> in its own process (model load excluded: the
queue-free ceiling). Command: `embedq embed CORPUS -o OUT.npy` as a user runs it, embedded default
(no --broker), timed from exec to exit, so Valkey, the workers' start and the model load are
included. The ratio command / in-process is the share of the encoder's speed the command keeps.
With --repeat N both are run N times, alternating, and the medians are compared (a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.corpus import make_corpus  # noqa: E402


def in_process(corpus: Path, dtype: str, folder: Path) -> float:
    """docs/s of the encoder alone, in a fresh process with every core."""
    out = folder / "inproc"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "methods.py"), f"embedq-inproc-{dtype}", str(corpus), str(out)],
        check=True,
    )
    result = json.loads(out.with_suffix(".json").read_text())
    return float(result["rows"]) / float(result["seconds"])


def command(corpus: Path, dtype: str, folder: Path, extra: list[str], docs: int) -> tuple[float, str]:
    """docs/s of the whole command, cold start included, and its summary line."""
    out = folder / "command.npy"
    for stale in folder.glob("command.npy*"):
        stale.unlink()
    argv = [sys.executable, "-m", "producer.cli", "embed", str(corpus), "-o", str(out), "--dtype", dtype, *extra]
    started = time.perf_counter()
    done = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    # Chunks cut and copies sent again (a straggler backup here would be the tail rule misfiring).
    extra_line = f"{manifest['chunks']} chunks, resent {manifest['resent_by_reason'] or 'none'}"
    return docs / wall, f"{done.stdout.strip().splitlines()[-1].split(' -> ')[0]}; {extra_line}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=6000)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "embedq-bench-corpus")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        help="another command variant in the same run, as its extra flags in one string (e.g. '--tail-chunks 4')",
    )
    parser.add_argument("extra", nargs="*", help="extra `embedq embed` flags, after --")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    corpus = make_corpus(args.cache, args.docs)
    inproc: list[float] = []
    whole: list[float] = []
    variants: dict[str, list[float]] = {flags: [] for flags in args.also}
    with tempfile.TemporaryDirectory(prefix="embedq-bench-") as tmp:
        folder = Path(tmp)
        for n in range(args.repeat):
            inproc.append(in_process(corpus, args.dtype, folder))
            rate, summary = command(corpus, args.dtype, folder, args.extra, args.docs)
            whole.append(rate)
            print(f"run {n + 1}: in-process {inproc[-1]:.1f} docs/s, command {rate:.1f} docs/s ({summary})")
            for flags, rates in variants.items():
                rate, summary = command(corpus, args.dtype, folder, flags.split(), args.docs)
                rates.append(rate)
                print(f"run {n + 1}: command {flags} {rate:.1f} docs/s ({summary})")
    a, b = statistics.median(inproc), statistics.median(whole)
    print(f"in-process encoder ({args.dtype}, load excluded): {a:.1f} docs/s")
    print(f"whole `embedq embed` (cold start included):      {b:.1f} docs/s")
    print(f"ratio command / in-process:                      {b / a:.3f}")
    for flags, rates in variants.items():
        print(f"ratio with {flags}: {statistics.median(rates) / a:.3f}")


if __name__ == "__main__":
    main()
