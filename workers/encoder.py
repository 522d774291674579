"""Tokenizer + model: `encode(texts) -> float32 array`, knowing nothing of Celery.

Each chunk is tokenized once, sorted by length, packed under a token budget, run under
`inference_mode` (optionally in bf16/fp16 autocast), pooled and normalised in fp32, and put back
in input order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from workers.batching import pack_by_tokens
from workers.protocol.errors import ConfigError, InputError, ModelError
from workers.protocol.model_info import ModelInfo

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX), where autocast pays off."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return False
    words = set(flags.split())
    return bool({"avx512_bf16", "amx_bf16"} & words)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r}: no CUDA device is visible to this worker; use cpu or auto")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> str:
    """Map auto|fp32|bf16|fp16 to what this device runs: fp32 is exact, the others are faster."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise ConfigError("dtype fp16 is for GPUs; on CPU use bf16 (or auto)")
    return requested


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA out-of-memory, however this torch version spells it."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(error, oom_type)) or "out of memory" in str(error).lower()


@dataclass(frozen=True)
class EncodeResult:
    """Embeddings in input order plus what it cost."""

    embeddings: np.ndarray
    tokens: int
    padded_tokens: int
    truncated: int
    batches: int
    dtype: str


class Encoder:
    """One loaded model; build it once per process with `Encoder.load`."""

    def __init__(self, info: ModelInfo, tokenizer: object, model: torch.nn.Module, device: torch.device) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.dim = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "dim", 0))
        self.pad_id = int(getattr(tokenizer, "pad_token_id", None) or 0)
        self.uses_token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
        # A fast tokenizer is not safe to share between threads ("Already borrowed").
        self._tokenizer_lock = threading.Lock()
        #: Replaced by tests to inject faults into the forward pass (a GPU cannot run here).
        self.forward_hook: Callable[[torch.Tensor], None] | None = None

    @classmethod
    def load(cls, info: ModelInfo, device: str = "auto") -> Encoder:
        from transformers import AutoModel, AutoTokenizer

        started = time.monotonic()
        target = resolve_device(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=info.is_local)
            model = AutoModel.from_pretrained(info.path, local_files_only=info.is_local)
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"model {info.path!r}: cannot load ({first_line})") from error
        model.eval().to(target)
        encoder = cls(info, tokenizer, model, target)
        log.info("loaded %s on %s in %.1f s", info.name, target, time.monotonic() - started)
        return encoder

    def tokenize(self, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
        """Token ids per text (truncated to `max_length`) and how many texts were truncated."""
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"record {index}: text must be a string, got {type(text).__name__}")
        # sentence-transformers strips every text before tokenizing; so do we, to match it exactly.
        stripped = [text.strip() for text in texts]
        with self._tokenizer_lock:
            try:
                encoded = self.tokenizer(  # type: ignore[operator]
                    stripped,
                    truncation=True,
                    max_length=max_length,
                    padding=False,
                    return_attention_mask=False,
                    return_token_type_ids=False,
                )
            except (UnicodeEncodeError, TypeError) as error:
                raise InputError(f"a text cannot be tokenized: {error}") from error
        ids: list[list[int]] = encoded["input_ids"]
        if getattr(encoded, "encodings", None):
            truncated = sum(1 for enc in encoded.encodings if enc.overflowing)
        else:  # slow tokenizers keep no overflow record; count by the untruncated length
            truncated = sum(1 for row in ids if len(row) >= max_length)
        return ids, truncated

    def encode(
        self,
        texts: Sequence[str],
        *,
        pooling: str = "mean",
        normalize: bool = True,
        max_length: int | None = None,
        dtype: str = "fp32",
        batch_tokens: int = 2048,
    ) -> EncodeResult:
        if pooling not in ("cls", "mean", "max"):
            raise ConfigError(f"pooling {pooling!r}: choose cls, mean or max")
        chosen_dtype = resolve_dtype(dtype, self.device)
        ids, truncated = self.tokenize(texts, max_length or self.info.max_length)
        lengths = [len(row) for row in ids]
        output = np.empty((len(ids), self.dim), dtype=np.float32)
        padded = 0
        batches = pack_by_tokens(lengths, batch_tokens)
        for batch in batches:
            padded += self._run_batch(ids, batch, output, pooling, normalize, chosen_dtype)
        return EncodeResult(output, sum(lengths), padded, truncated, len(batches), chosen_dtype)

    def _run_batch(
        self, ids: list[list[int]], batch: list[int], output: np.ndarray, pooling: str, normalize: bool, dtype: str
    ) -> int:
        """Embed one batch into `output`; on GPU out-of-memory, split it in halves and retry."""
        try:
            vectors = self._forward([ids[i] for i in batch], pooling, normalize, dtype)
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error) or len(batch) == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(batch) // 2
            log.warning("out of memory on a batch of %d rows; retrying as two batches", len(batch))
            return self._run_batch(ids, batch[:half], output, pooling, normalize, dtype) + self._run_batch(
                ids, batch[half:], output, pooling, normalize, dtype
            )
        output[batch] = vectors
        return len(batch) * max(len(ids[i]) for i in batch)

    def _autocast(self, dtype: str) -> contextlib.AbstractContextManager[object]:
        if dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_TORCH_DTYPES[dtype])

    def _forward(self, rows: list[list[int]], pooling: str, normalize: bool, dtype: str) -> np.ndarray:
        longest = max(len(row) for row in rows)
        input_ids = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        inputs = {
            "input_ids": torch.from_numpy(input_ids).to(self.device),
            "attention_mask": torch.from_numpy(mask).to(self.device),
        }
        if self.uses_token_types:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        if self.forward_hook is not None:
            self.forward_hook(inputs["input_ids"])
        with torch.inference_mode(), self._autocast(dtype):
            hidden = self.model(**inputs).last_hidden_state
        # Pooling and normalisation in fp32 whatever the forward ran in.
        hidden = hidden.float()
        attention = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "mean":
            pooled = (hidden * attention).sum(1) / attention.sum(1).clamp(min=1e-9)
        else:
            pooled = hidden.masked_fill(attention == 0, -1e9).max(1).values
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy()


def import_model_classes(info: ModelInfo) -> None:
    """Import transformers and the model's and tokenizer's classes without building anything.

    Reads only config.json and tokenizer_config.json: no weights, no tensor, no thread pool. The worker
    main process calls this before forking, so that children inherit the modules instead of importing
    them again (see workers/app.py).
    """
    import json
    from pathlib import Path

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config = AutoConfig.from_pretrained(info.path, local_files_only=info.is_local)
    MODEL_MAPPING[type(config)]  # resolving the class imports its modeling module, the slow part
    tokenizer_config = Path(info.path) / "tokenizer_config.json"
    if tokenizer_config.is_file():
        name = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("tokenizer_class")
        if isinstance(name, str):
            tokenizer_class_from_name(name)


def configure_threads(threads: int) -> None:
    """Give this process `threads` intra-op threads; never more than its share of the cores."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(max(1, threads))


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    started = time.perf_counter()
    yield lambda: (time.perf_counter() - started) * 1000.0
