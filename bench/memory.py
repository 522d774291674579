"""Worker memory over a long job: RSS of every pool child, sampled while N chunks of real text run.

    .venv/bin/python bench/memory.py [--chunks 300] [--chunk-size 64] [--dtype bf16] [--runtime auto]
                                     [--env NAME=VALUE ...]

Starts its own Valkey and one `embedq worker` (default children and threads; `--env` adds variables to
the worker's environment, e.g. `--env EMBEDQ_MAX_CHILD_MEMORY_MB=0` or `--env MALLOC_ARENA_MAX=2`),
runs `embedq embed --broker` on chunks x chunk-size fortunes, and prints one line per sample (seconds,
chunks done, RSS MB of each child) and a summary: RSS after the first chunk, at the end and at most,
per child, docs/s, and how many models were loaded (more than the children means a child was recycled);
then the curve: each child's RSS (min-max) in every window of `--every` chunks after warm-up, and the slope
of a straight line through the window floors (and through every sample), in MB per 100 chunks of that child's
own (its share of the chunks done).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.corpus import make_corpus  # noqa: E402
from producer.local.embedded_redis import EmbeddedRedis  # noqa: E402
from producer.local.processes import start_process, stop_process  # noqa: E402


def rss_mb(pid: int) -> float | None:
    """Resident set of one process in MB (shared pages included), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


class Sampler(threading.Thread):
    """Every `interval_s`: chunks done so far and the RSS of each pool child of `worker_pid`."""

    def __init__(self, worker_pid: int, client: redis.Redis, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.worker_pid = worker_pid
        self.client = client
        self.interval_s = interval_s
        self.started = time.monotonic()
        self.samples: list[tuple[float, int, dict[int, float]]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            done = int(self.client.hget("embedq:stats", "chunks_done") or 0)
            sizes = {pid: size for pid in children(self.worker_pid) if (size := rss_mb(pid)) is not None}
            sample = (time.monotonic() - self.started, done, sizes)
            self.samples.append(sample)
            cells = "  ".join(f"{pid}:{size:,.0f}" for pid, size in sorted(sizes.items()))
            print(f"{sample[0]:7.1f} s  chunks {done:4d}  RSS MB {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=300)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--runtime", default="auto", help="EMBEDQ_RUNTIME of the worker")
    parser.add_argument("--warmup", type=int, default=20, help="chunks done before the curve starts")
    parser.add_argument("--every", type=int, default=25, help="chunks between two points of the printed curve")
    parser.add_argument("--concurrency", type=int, default=None, help="pool children (default: one per core)")
    parser.add_argument("--interval-s", type=float, default=5.0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra worker variable")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "embedq-bench")
    args = parser.parse_args()

    corpus = make_corpus(args.cache, args.chunks * args.chunk_size)
    work = Path(tempfile.mkdtemp(prefix="memory-", dir=args.cache))
    env = {k: v for k, v in os.environ.items() if k != "EMBEDQ_BROKER_URL"}
    env |= {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env |= {"EMBEDQ_RUNTIME": args.runtime} | dict(item.split("=", 1) for item in args.env)
    server = EmbeddedRedis(work / "valkey").start()
    worker = None
    try:
        client = redis.Redis.from_url(server.url)
        argv = [sys.executable, "-m", "producer.cli", "worker", "--broker", server.url, "--loglevel", "WARNING"]
        if args.concurrency:
            argv += ["--concurrency", str(args.concurrency)]
        worker = start_process(argv, env=env, log_path=work / "worker.log")
        embed = [sys.executable, "-m", "producer.cli", "embed", str(corpus), "-o", str(work / "out.npy")]
        embed += ["--broker", server.url, "--dtype", args.dtype, "--chunk-size", str(args.chunk_size), "--no-progress"]
        embed += ["--wait-for-workers", "300"]  # the worker starts alongside: wait for it rather than exit 7
        print(
            f"memory: {args.chunks} chunks x {args.chunk_size} fortunes, {args.dtype}, runtime {args.runtime}, "
            f"worker env {args.env}"
        )
        sampler = Sampler(worker.pid, client, args.interval_s)
        sampler.start()
        started = time.monotonic()
        finished = start_process(embed, env=env, log_path=work / "embed.log").wait()
        wall_s = time.monotonic() - started
        sampler.stopping.set()
        sampler.join()
        if finished != 0:
            raise SystemExit(f"memory: embed failed (exit {finished}); see {work}/embed.log and {work}/worker.log")
        summarise(
            sampler.samples,
            args.chunks * args.chunk_size / wall_s,
            int(client.hget("embedq:stats", "model_loads") or 0),
        )
        curve(sampler.samples, args.warmup, args.every)
    finally:
        if worker is not None:
            stop_process(worker)
        server.stop()


def summarise(samples: list[tuple[float, int, dict[int, float]]], docs_s: float, model_loads: int) -> None:
    """Per child: RSS at the first sample after a chunk finished, at the end, and its peak."""
    pids = sorted({pid for _, _, sizes in samples for pid in sizes})
    print(f"\ndocs/s {docs_s:,.1f} (start-up included); model loads {model_loads}")
    for pid in pids:
        seen = [(done, sizes[pid]) for _, done, sizes in samples if pid in sizes]
        warm = next((size for done, size in seen if done > 0), seen[0][1])
        print(
            f"child {pid}: after first chunk {warm:,.0f} MB, at end {seen[-1][1]:,.0f} MB, "
            f"peak {max(size for _, size in seen):,.0f} MB over {seen[-1][0]} chunks done in all"
        )


def curve(samples: list[tuple[float, int, dict[int, float]]], warmup: int, every: int) -> None:
    """Per child: its RSS floor in every window of `every` chunks after `warmup`, and the slope through those floors.

    A sample taken during a forward pass includes that batch's activations (a long text's batch adds 10-20 MB for
    a moment); what a long job must not do is keep memory. So each window shows min-max of its samples, and the
    slope (MB per 100 chunks of the child's own, i.e. its share of the chunks done) is fitted through the window
    floors; the slope through every raw sample is printed beside it.
    """
    import numpy as np

    pids = sorted({pid for _, _, sizes in samples for pid in sizes})
    share = max(1, len(pids))
    print(
        f"\ncurve after {warmup} chunks (x = chunks done by all children; RSS MB min-max per window of {every}; "
        "slope per 100 chunks of the child's own):"
    )
    for pid in pids:
        points = [(done, sizes[pid]) for _, done, sizes in samples if pid in sizes and done >= warmup]
        if len(points) < 2:
            print(f"child {pid}: too few samples after warm-up")
            continue
        windows: dict[int, list[float]] = {}
        for done, size in points:
            windows.setdefault(warmup + (done - warmup) // every * every, []).append(size)
        shown = "  ".join(f"{start}:{min(sizes):,.0f}-{max(sizes):,.0f}" for start, sizes in sorted(windows.items()))
        xs = np.array([done for done, _ in points], dtype=float) / share
        raw = float(np.polyfit(xs, [size for _, size in points], 1)[0]) * 100 if np.ptp(xs) else 0.0
        starts = np.array(sorted(windows), dtype=float) / share
        floors = [min(windows[start]) for start in sorted(windows)]
        floor = float(np.polyfit(starts, floors, 1)[0]) * 100 if len(starts) > 1 else 0.0
        print(f"child {pid}: {shown}  ->  floor {floor:+.1f} MB per 100 chunks (every sample: {raw:+.1f})")


if __name__ == "__main__":
    main()
