"""Warm workers the bench starts itself (its own Valkey + `embedq worker`), for two measurements:

- queue overhead: `embedq embed --broker` on the corpus with workers already loaded, against the
  same encoder in one process (start-up is then measured apart, not mixed in);
- memory: a large corpus, sampling the producer's RSS and the server's `used_memory` as it runs.

The memory measurement also runs on its own, e.g. a 100,000-row Parquet corpus on a tiny model (so
that the producer, not the model, is what takes the time):

    PYTHONPATH=. .venv/bin/python bench/large.py 100000 --parquet --tiny-model [--precision int8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.corpus import make_corpus, make_parquet_corpus  # noqa: E402
from bench.measure import PeakSampler, Timed, run_sampled  # noqa: E402
from producer.local.embedded_redis import EmbeddedRedis  # noqa: E402
from producer.local.processes import start_process, stop_process  # noqa: E402

MB = 2**20


class WarmWorkers:
    """A Valkey and one `embedq worker` (default children and threads), stopped on exit."""

    def __init__(self, work: Path, cache: Path, model: str | None = None) -> None:
        self.work = work
        self.cache = cache
        #: --model for the worker and every job (None: the worker's default, the packaged MiniLM).
        self.model_args = ["--model", model] if model else []
        self.server = EmbeddedRedis(work / "valkey-warm")
        self.env = {k: v for k, v in os.environ.items() if k != "EMBEDQ_BROKER_URL"}
        self.env["PYTHONPATH"] = str(ROOT)
        self.worker = None
        self.client: redis.Redis | None = None

    def __enter__(self) -> WarmWorkers:
        self.server.start()
        self.client = redis.Redis.from_url(self.server.url)
        argv = [sys.executable, "-m", "producer.cli", "worker", "--broker", self.server.url, "--loglevel", "WARNING"]
        argv += self.model_args
        self.worker = start_process(argv, env=self.env, log_path=self.work / "worker-warm.log")
        # A tiny job finishes only once every child has its model loaded (or at least one has).
        self.embed(make_corpus(self.cache, 8), "fp32", "warm-up", "--wait-for-workers", "120")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self.client is not None:
            self.client.close()
        if self.worker is not None:
            stop_process(self.worker)
        self.server.stop()

    def embed(
        self, corpus: Path, dtype: str, name: str, *extra: str, suffix: str = ".npy"
    ) -> tuple[Timed, dict[str, object], Path]:
        """`embedq embed --broker` on warm workers; peak RSS of the producer process alone."""
        output = self.work / f"{name}{suffix}"
        argv = [sys.executable, "-m", "producer.cli", "embed", str(corpus), "-o", str(output)]
        # The worker may still be loading its model (slowly, on a busy machine): wait for it, not exit 7.
        argv += ["--broker", self.server.url, "--dtype", dtype, "--no-progress", "--wait-for-workers", "300"]
        argv += [*self.model_args, *extra]
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

    def large(self, docs: int, dtype: str = "bf16", *, parquet: bool = False, precision: str = "float32") -> str:
        """Embed `docs` documents; one markdown line with producer peak RSS and Redis peak used_memory."""
        assert self.client is not None
        client = self.client
        corpus = make_parquet_corpus(self.cache, docs) if parquet else make_corpus(self.cache, docs)
        print(f"bench: {docs:,} docs ({corpus.name}) on warm workers ...", file=sys.stderr, flush=True)
        with PeakSampler(lambda: int(client.info("memory")["used_memory"]), interval_s=0.5) as sampler:
            timed, manifest, output = self.embed(
                corpus, dtype, "large", "--precision", precision, suffix=".parquet" if parquet else ".npy"
            )
        info = client.info("memory")
        peak = max(int(info["used_memory_peak"]), sampler.peak)
        output.unlink(missing_ok=True)
        return (
            f"- {docs:,} docs ({corpus.suffix[1:]} in, {dtype}, {precision} {output.suffix[1:]} out, model "
            f"{manifest['model']}, `embedq embed --broker` on warm workers): {timed.wall_s:.0f} s, "
            f"{docs / timed.wall_s:,.0f} docs/s, {manifest['chunks']} chunks; producer peak RSS "
            f"{timed.peak_rss / MB:,.0f} MB; Redis used_memory peak {peak / MB:,.1f} MB "
            f"(empty server {int(info['used_memory_startup']) / MB:,.1f} MB) "
            f"[measured {time.strftime('%H:%M UTC', time.gmtime())}]"
        )


def tiny_model(cache: Path) -> Path:
    """A 2-layer, 32-wide BERT (random weights, fixed seed) with the packaged tokenizer, as the tests build it."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from workers.protocol.model_info import default_model_path

    folder = cache / "tiny-bert"
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_path() / name, folder / name)
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128
    )
    BertModel(config).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("docs", type=int, nargs="?", default=100_000, help="corpus rows (default 100000)")
    parser.add_argument("--parquet", action="store_true", help="Parquet in and out (default: JSONL in, .npy out)")
    parser.add_argument("--tiny-model", action="store_true", help="a tiny random BERT (default: the packaged MiniLM)")
    parser.add_argument("--precision", default="float32", help="--precision of the job (default float32)")
    parser.add_argument("--dtype", default="fp32", help="--dtype of the job (default fp32)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "embedq-bench")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = str(tiny_model(args.cache)) if args.tiny_model else None
    with (
        tempfile.TemporaryDirectory(prefix="embedq-large-") as work,
        WarmWorkers(Path(work), args.cache, model) as warm,
    ):
        print(warm.large(args.docs, args.dtype, parquet=args.parquet, precision=args.precision))


if __name__ == "__main__":
    main()
