"""The encoder: `encode(texts) -> float32 array`, knowing nothing of Celery, the same for every runtime.

Each chunk is tokenized once, sorted by length, packed under a token budget, run by the chosen
runtime's backend (workers/encoder/backend.py), normalised in fp32, and put back in input order.
Nothing here imports torch: an encoder on OpenVINO or ONNX Runtime never loads it (workers/encoder/device.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.encoder.backend import Backend, choose_runtime
from workers.encoder.batching import pack_by_tokens
from workers.encoder.device import (
    bf16_emulated,
    default_threads,
    device_type,
    is_out_of_memory,
    resolve_device,
    resolve_dtype,
)
from workers.encoder.prompting import cut, pooling_mask, prompt_length
from workers.encoder.tokenizer import Tokenizer, load_tokenizer
from workers.encoder.windows import plan_windows
from workers.protocol.dimensions import check_dimensions
from workers.protocol.errors import ConfigError, InputError, ModelError
from workers.protocol.events import EMULATED_BF16
from workers.protocol.long_docs import CHUNKS, LONG_POLICIES, TRUNCATE
from workers.protocol.model_info import ModelInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeResult:
    """Embeddings in input order plus what it cost."""

    embeddings: np.ndarray
    tokens: int
    padded_tokens: int
    truncated: int
    batches: int
    dtype: str
    #: Under --long chunk-mean / chunks: texts split into windows, the windows they became, and (chunks only)
    #: the window table of workers/protocol/long_docs.py, one row per embedding row.
    split: int = 0
    windows: int = 0
    window_table: np.ndarray | None = None
    #: bf16 ran emulated on a CPU without native bf16 (device.bf16_emulated): the caller should say so.
    emulated: bool = False


def _load_backend(runtime: str, info: ModelInfo, threads: int, uses_token_types: bool, cache_dir: str) -> Backend:
    """The non-torch backend `runtime`, converting the model on first use (imports its package only now)."""
    if runtime == "openvino":
        from workers.encoder.openvino_backend import OpenVinoBackend

        return OpenVinoBackend.load(info, threads, uses_token_types, cache_dir)
    from workers.encoder.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend.load(info, threads, uses_token_types, cache_dir)


class Encoder:
    """One model and its runtime(s); build it once per process with `Encoder.load`."""

    def __init__(
        self,
        info: ModelInfo,
        tokenizer: Tokenizer,
        device: str,
        *,
        runtime: str = "torch",
        threads: int = 1,
        cache_dir: str = "",
    ) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self.device = device
        self.runtime = runtime
        self.threads = threads
        self.cache_dir = cache_dir
        #: The runtime that serves the default dtype (what `runtime` resolved to), set by `load`.
        self.runtime_name = runtime
        self.dim = info.dim
        self.pad_id = tokenizer.pad_id
        self.uses_token_types = tokenizer.uses_token_types
        # A fast tokenizer is not safe to share between threads ("Already borrowed").
        self._tokenizer_lock = threading.Lock()
        self._backends: dict[str, Backend] = {}
        self._backends_lock = threading.Lock()
        self._said_emulated = False
        #: Per thread (OpenVINO's infer requests, and the memory they keep, are per thread): dtype -> the largest
        #: batch budget warmed up.
        self._warmed = threading.local()
        #: Replaced by tests to inject faults into the forward pass (a GPU cannot run here); gets the input ids.
        self.forward_hook: Callable[[np.ndarray], None] | None = None

    @classmethod
    def load(
        cls,
        info: ModelInfo,
        device: str = "auto",
        *,
        runtime: str = "torch",
        dtype: str = "fp32",
        threads: int | None = None,
        cache_dir: str = "",
    ) -> Encoder:
        """Load the tokenizer and the backend that serves `dtype` under `runtime` (others load on first use).

        `runtime="auto"` picks the fastest exact runtime installed (backend.AUTO_ORDER), and falls back to
        torch, with a warning, if the model cannot be converted for it; an explicit runtime raises instead.
        """
        started = time.monotonic()
        target = resolve_device(device)
        encoder = cls(
            info,
            load_tokenizer(info, cache_dir),
            target,
            runtime=runtime,
            threads=threads or default_threads(),
            cache_dir=cache_dir,
        )
        chosen = encoder.backend(resolve_dtype(dtype, target))
        encoder.runtime_name = chosen.name
        log.info("loaded %s on %s (%s) in %.1f s", info.name, target, chosen.name, time.monotonic() - started)
        return encoder

    def backend(self, dtype: str) -> Backend:
        """The backend that runs `dtype` (already resolved), loaded once and kept."""
        name = choose_runtime(self.runtime, device_type(self.device), dtype)
        with self._backends_lock:
            if name not in self._backends:
                self._backends[name] = self._new_backend(name)
            return self._backends[name]

    def _new_backend(self, name: str) -> Backend:
        if name != "torch":
            try:
                return _load_backend(name, self.info, self.threads, self.uses_token_types, self.cache_dir)
            except ModelError as error:
                if self.runtime != "auto":
                    raise
                log.warning("%s; EMBEDQ_RUNTIME=auto falls back to torch", error)
                name = "torch"
        if "torch" not in self._backends:
            from workers.encoder.torch_backend import TorchBackend, load_module

            self._backends["torch"] = TorchBackend(
                load_module(self.info), self.device, self.uses_token_types, self.threads
            )
        return self._backends["torch"]

    @property
    def model(self) -> Any:
        """The torch module (loaded if the encoder runs another runtime): what the other runtimes convert."""
        with self._backends_lock:
            backend = self._backends.get("torch") or self._new_backend("torch")
        return backend.model  # type: ignore[attr-defined]

    def warm_up(self, batch_tokens: int, dtype: str) -> None:
        """Run the largest batch the budget allows once (longest rows, most attention), so that the runtime's
        buffers reach their high-water mark now: a long job's RSS then stays flat instead of stepping up
        whenever a longer batch first comes along (measured: +19 MB per 100 chunks without, OpenVINO fp32)."""
        chosen_dtype = resolve_dtype(dtype, self.device)
        longest = max(2, min(self.info.max_length, batch_tokens))
        rows = max(1, batch_tokens // longest)
        input_ids = np.full((rows, longest), self.pad_id, dtype=np.int64)
        self.backend(chosen_dtype).embed(input_ids, np.ones_like(input_ids), "mean", chosen_dtype)
        budgets = self._warmed_budgets()
        budgets[chosen_dtype] = max(budgets.get(chosen_dtype, 0), batch_tokens)

    def _warmed_budgets(self) -> dict[str, int]:
        """This thread's dtype -> the largest batch budget warmed up."""
        budgets: dict[str, int] = self._warmed.__dict__.setdefault("budgets", {})
        return budgets

    def _warm_once(self, batch_tokens: int, dtype: str) -> None:
        """Warm up `dtype` in this thread before its first batch: a worker warms its own default dtype at start,
        and a job asking for another (bf16 on workers started as fp32) compiles that one on first use, whose
        buffers then grew in steps over hundreds of chunks (OpenVINO bf16, AMD EPYC: +22 MB at chunk 500)."""
        budgets = self._warmed_budgets()
        if budgets.get(dtype, 0) >= batch_tokens:
            return
        try:
            self.warm_up(batch_tokens, dtype)
        except (RuntimeError, MemoryError) as error:
            # A budget too big for the GPU: the real batches split themselves on out-of-memory (`_run_batch`),
            # so the job goes on; only the warm-up is given up, once.
            if not is_out_of_memory(error):
                raise
            budgets[dtype] = batch_tokens
            release_cache = getattr(self.backend(dtype), "release_cache", None)
            if release_cache is not None:
                release_cache()
            log.warning(
                "warm-up of %s at %d tokens per batch ran out of memory; batches split as needed", dtype, batch_tokens
            )

    def tokenize(self, texts: Sequence[str], max_length: int, prompt: str = "") -> tuple[list[list[int]], int]:
        """Token ids per text, `prompt` prepended (truncated to `max_length`), and how many texts were truncated."""
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"record {index}: text must be a string, got {type(text).__name__}")
        # sentence-transformers strips every text before tokenizing; so do we, to match it exactly.
        stripped = [(prompt + text).strip() for text in texts]
        with self._tokenizer_lock:
            try:
                ids, cut_flags = self.tokenizer.encode(stripped, max_length)
            except (UnicodeEncodeError, TypeError) as error:
                raise InputError(f"a text cannot be tokenized: {error}") from error
        return ids, sum(cut_flags)

    def encode(
        self,
        texts: Sequence[str],
        *,
        pooling: str = "mean",
        normalize: bool = True,
        max_length: int | None = None,
        dtype: str = "fp32",
        batch_tokens: int = 2048,
        long: str = TRUNCATE,
        prompt: str = "",
        dimensions: int | None = None,
    ) -> EncodeResult:
        """Embed `texts` in input order: float32 rows, L2-normalised unless `normalize` is False.

        `long` (workers/protocol/long_docs.py) says what becomes of a text over `max_length`: truncated, or
        split into windows (workers/encoder/windows.py) that are averaged into its row or each give a row.
        `prompt` is prepended to each text (and left out of pooling when the model's Pooling says
        include_prompt false); `dimensions` keeps the first N components, before normalising
        (workers/encoder/prompting.py).
        """
        if pooling not in ("cls", "mean", "max"):
            raise ConfigError(f"pooling {pooling!r}: choose cls, mean or max")
        if long not in LONG_POLICIES:
            raise ConfigError(f"long {long!r}: choose one of {', '.join(LONG_POLICIES)}")
        if long != TRUNCATE and prompt:
            # Windows are cut from the text's own tokens; where a prompt would go in each is not settled yet.
            raise ConfigError(f"long {long!r} with a prompt: not supported; use --long truncate or --prompt ''")
        check_dimensions(dimensions, self.dim, self.info.name)
        chosen_dtype = resolve_dtype(dtype, self.device)
        emulated = bf16_emulated(chosen_dtype, self.device)
        if emulated and not self._said_emulated:
            self._said_emulated = True
            log.warning("%s", EMULATED_BF16)
        backend = self.backend(chosen_dtype)
        self._warm_once(batch_tokens, chosen_dtype)
        limit = max_length or self.info.max_length
        ids, truncated = self.tokenize(texts, limit, prompt)
        skip = 0
        if prompt and not self.info.include_prompt:
            with self._tokenizer_lock:
                skip = prompt_length(self.tokenizer, prompt, limit)
        plan = None
        if long != TRUNCATE:
            plan = plan_windows(self, texts, ids, limit)
            ids, truncated = plan.rows, 0
        lengths = [len(row) for row in ids]
        output = np.empty((len(ids), self.dim), dtype=np.float32)
        padded = 0
        batches = pack_by_tokens(lengths, batch_tokens)
        for batch in batches:
            padded += self._run_batch(backend, ids, batch, output, pooling, chosen_dtype, skip)
        if plan is not None:
            output = plan.combine(output, long)
        output = cut(output, dimensions)
        if normalize and len(output):
            # As torch.nn.functional.normalize: divide by the norm, never by less than 1e-12.
            output /= np.maximum(np.linalg.norm(output, axis=1, keepdims=True), 1e-12)
        if plan is None:
            return EncodeResult(output, sum(lengths), padded, truncated, len(batches), chosen_dtype, emulated=emulated)
        table = plan.table if long == CHUNKS else None
        return EncodeResult(
            output,
            sum(lengths),
            padded,
            truncated,
            len(batches),
            chosen_dtype,
            plan.split,
            plan.windows,
            table,
            emulated=emulated,
        )

    def _run_batch(
        self,
        backend: Backend,
        ids: list[list[int]],
        batch: list[int],
        output: np.ndarray,
        pooling: str,
        dtype: str,
        skip: int = 0,
    ) -> int:
        """Embed one batch into `output`; on GPU out-of-memory, split it in halves and retry."""
        rows = [ids[i] for i in batch]
        longest = max(len(row) for row in rows)
        input_ids = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        try:
            if self.forward_hook is not None:
                self.forward_hook(input_ids)
            output[batch] = backend.embed(input_ids, mask, pooling, dtype, pooling_mask(mask, skip))
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error) or len(batch) == 1:
                raise
            release_cache = getattr(backend, "release_cache", None)  # the torch backend's, on a GPU
            if release_cache is not None:
                release_cache()
            half = len(batch) // 2
            log.warning("out of memory on a batch of %d rows; retrying as two batches", len(batch))
            return self._run_batch(backend, ids, batch[:half], output, pooling, dtype, skip) + self._run_batch(
                backend, ids, batch[half:], output, pooling, dtype, skip
            )
        return len(batch) * longest
