"""Warm workers the bench starts itself (its own Valkey + `embedq worker`), for two measurements:

- queue overhead: `embedq embed --broker` on the corpus with workers already loaded, against the
  same encoder in one process (start-up is then measured apart, not mixed in);
- memory: a large corpus, sampling the producer's RSS and the server's `used_memory` as it runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import TracebackType

import numpy as np
import redis

from bench.corpus import make_corpus
from bench.measure import PeakSampler, Timed, run_sampled
from producer.local.embedded_redis import EmbeddedRedis
from producer.local.processes import start_process, stop_process

MB = 2**20
ROOT = Path(__file__).resolve().parents[1]


class WarmWorkers:
    """A Valkey and one `embedq worker` (default children and threads), stopped on exit."""

    def __init__(self, work: Path, cache: Path) -> None:
        self.work = work
        self.cache = cache
        self.server = EmbeddedRedis(work / "valkey-warm")
        self.env = {k: v for k, v in os.environ.items() if k != "EMBEDQ_BROKER_URL"}
        self.env["PYTHONPATH"] = str(ROOT)
        self.worker = None
        self.client: redis.Redis | None = None

    def __enter__(self) -> WarmWorkers:
        self.server.start()
        self.client = redis.Redis.from_url(self.server.url)
        argv = [sys.executable, "-m", "producer.cli", "worker", "--broker", self.server.url, "--loglevel", "WARNING"]
        self.worker = start_process(argv, env=self.env, log_path=self.work / "worker-warm.log")
        # A tiny job finishes only once every child has its model loaded (or at least one has).
        self.embed(make_corpus(self.cache, 8), "fp32", "warm-up")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self.client is not None:
            self.client.close()
        if self.worker is not None:
            stop_process(self.worker)
        self.server.stop()

    def embed(self, corpus: Path, dtype: str, name: str) -> tuple[Timed, dict[str, object], Path]:
        """`embedq embed --broker` on warm workers; peak RSS of the producer process alone."""
        output = self.work / f"{name}.npy"
        argv = [sys.executable, "-m", "producer.cli", "embed", str(corpus), "-o", str(output)]
        # The worker may still be loading its model (slowly, on a busy machine): wait for it, not exit 7.
        argv += ["--broker", self.server.url, "--dtype", dtype, "--no-progress", "--wait-for-workers", "300"]
        timed = run_sampled(argv, env=self.env, log=self.work / f"{name}.log", sample_pid_rss=True)
        if timed.returncode != 0:
            raise SystemExit(f"bench: {name} failed (exit {timed.returncode}):\n{timed.output[-2000:]}")
        return timed, json.loads(Path(f"{output}.manifest.json").read_text()), output

    def encode_ms(self) -> int:
        """Milliseconds the workers have spent inside `encode` so far (the fleet counter tasks keep)."""
        assert self.client is not None
        return int(self.client.hget("embedq:stats", "encode_ms") or 0)

    def embed_rows(self, corpus: Path, dtype: str, name: str) -> tuple[float, np.ndarray, float]:
        """Wall seconds, the embeddings, and seconds the workers spent encoding (summed over children)."""
        before = self.encode_ms()
        timed, _, output = self.embed(corpus, dtype, name)
        return timed.wall_s, np.load(output), (self.encode_ms() - before) / 1000.0

    def large(self, docs: int, dtype: str = "bf16") -> str:
        """Embed `docs` documents; one markdown line with producer peak RSS and Redis peak used_memory."""
        assert self.client is not None
        client = self.client
        corpus = make_corpus(self.cache, docs)
        print(f"bench: {docs:,} docs on warm workers ...", file=sys.stderr, flush=True)
        with PeakSampler(lambda: int(client.info("memory")["used_memory"]), interval_s=0.5) as sampler:
            timed, manifest, output = self.embed(corpus, dtype, "large")
        info = client.info("memory")
        peak = max(int(info["used_memory_peak"]), sampler.peak)
        output.unlink(missing_ok=True)
        return (
            f"- {docs:,} docs ({dtype}, `embedq embed --broker` on warm workers): {timed.wall_s:.0f} s, "
            f"{docs / timed.wall_s:,.0f} docs/s, {manifest['chunks']} chunks; producer peak RSS "
            f"{timed.peak_rss / MB:,.0f} MB; Redis used_memory peak {peak / MB:,.1f} MB "
            f"(empty server {int(info['used_memory_startup']) / MB:,.1f} MB) "
            f"[measured {time.strftime('%H:%M UTC', time.gmtime())}]"
        )
