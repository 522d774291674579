"""Fleet benchmark on namespaced hosts (tests/fleet): scaling, a lost host, a slow host. Needs root.

    .venv/bin/python bench/fleet.py [DOCS] [--chunk-size N]

One run, warm workers (one pool child, one torch thread per host, embedq's defaults otherwise), the
same held-out fortunes corpus for every row:
1. one host alone, then two hosts: docs/s of both and the ratio (target: 2 hosts >= 1.9x one);
2. two hosts, host2's link cut 8 s into the job (never healed during it): wall time against the
   no-fault time (target: within +30 s), min cosine against sentence-transformers;
3. two hosts, host2 frozen with SIGSTOP 8 s in, thawed after the job: the same, and no result key left;
4. two hosts, host2 capped at 5% of a core: wall time against host1 alone (target: <= 1.1x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.corpus import make_corpus, read_texts  # noqa: E402
from tests.fleet.harness import Fleet, JobRun, start_fleet  # noqa: E402
from tests.fleet.netns import unavailable_reason  # noqa: E402

FAULT_AT_S = 8.0


def _reference(texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    from workers.protocol.model_info import default_model_path

    model = SentenceTransformer(str(default_model_path()), device="cpu")
    return np.asarray(model.encode(texts, batch_size=32, normalize_embeddings=True))


def _min_cos(run: JobRun, reference: np.ndarray) -> float:
    matrix = run.matrix()
    assert matrix.shape == reference.shape, (matrix.shape, reference.shape)
    return float(np.min(np.sum(matrix * reference, axis=1)))


def _run(fleet: Fleet, name: str, corpus: Path, chunk_rows: int, fault: str = "") -> JobRun:
    host2 = fleet.hosts["host2"]
    started = time.monotonic()
    process, out = fleet.start_job(name, corpus=corpus, chunk_rows=chunk_rows)
    injected = threading.Event()
    if fault:
        timer = threading.Timer(FAULT_AT_S, lambda: (getattr(fleet.network, fault)(host2), injected.set()))
        timer.start()
    try:
        run = fleet.finish(process, out, started, timeout_s=1800)
    finally:
        if fault:
            timer.cancel()
            if injected.is_set():
                {"cut": fleet.network.heal, "freeze": fleet.network.thaw}[fault](host2)
    if run.code != 0:
        raise SystemExit(f"bench: {name} failed: {run.stderr[-2000:]}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("docs", nargs="?", type=int, default=4000)
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"bench: {reason}")
    corpus = make_corpus(Path(tempfile.gettempdir()) / "embedq-bench", args.docs)
    texts = read_texts(corpus)
    print(f"corpus: {len(texts)} fortunes, chunks of {args.chunk_size}; reference: sentence-transformers fp32 ...")
    reference = _reference(texts)
    fleet = start_fleet(Path(tempfile.mkdtemp(prefix="embedq-fleet-")), ("host1", "host2"), start_workers=False)
    rows: list[tuple[str, JobRun, str]] = []
    try:
        fleet.start_worker("host1")
        _wait(fleet, {"host1"})
        fleet.run_job("warm-1", corpus=corpus, chunk_rows=args.chunk_size)
        one = _run(fleet, "one-host", corpus, args.chunk_size)
        rows.append(("1 host", one, ""))
        fleet.start_worker("host2")
        _wait(fleet, {"host1", "host2"})
        fleet.run_job("warm-2", corpus=corpus, chunk_rows=args.chunk_size)
        two = _run(fleet, "two-hosts", corpus, args.chunk_size)
        rows.append(("2 hosts", two, f"{two.wall_s and one.wall_s / two.wall_s:.2f}x one host (target >= 1.9x)"))
        cut = _run(fleet, "cut", corpus, args.chunk_size, fault="cut")
        rows.append(
            (f"2 hosts, host2 cut at {FAULT_AT_S:g} s", cut, f"+{cut.wall_s - two.wall_s:.1f} s (target <= +30 s)")
        )
        _wait(fleet, {"host1", "host2"})
        frozen = _run(fleet, "frozen", corpus, args.chunk_size, fault="freeze")
        left = len(fleet.result_keys())
        rows.append(
            (
                f"2 hosts, host2 frozen at {FAULT_AT_S:g} s",
                frozen,
                f"+{frozen.wall_s - two.wall_s:.1f} s, {left} keys left",
            )
        )
        _wait(fleet, {"host1", "host2"})
        fleet.network.throttle(fleet.hosts["host2"], 5)
        try:
            slow = _run(fleet, "slow", corpus, args.chunk_size)
        finally:
            fleet.network.unthrottle(fleet.hosts["host2"])
        rows.append(("2 hosts, host2 at 5% CPU", slow, f"{slow.wall_s / one.wall_s:.2f}x host1 alone (target <= 1.1x)"))
    finally:
        fleet.network.close()
    print("\n| run | wall s | docs/s | min cos vs ST | re-sent (reason) | vs target |\n|---|---:|---:|---:|---|---|")
    for name, run, note in rows:
        resent = ", ".join(f"{n} {r}" for r, n in dict(run.manifest()["resent_by_reason"]).items()) or "-"  # type: ignore[call-overload]
        cos = _min_cos(run, reference)
        print(f"| {name} | {run.wall_s:.1f} | {len(texts) / run.wall_s:.1f} | {cos:.6f} | {resent} | {note} |")


def _wait(fleet: Fleet, hosts: set[str]) -> None:
    deadline = time.monotonic() + 180
    while fleet.alive() != hosts or not all("ready:" in fleet.log(h) for h in hosts):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: workers {hosts} not ready: {fleet.alive()}")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
