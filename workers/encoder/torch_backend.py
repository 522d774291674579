"""The torch runtime: eager PyTorch under inference_mode, fp32 or bf16/fp16 autocast; the CUDA path.

Also where a model folder becomes a torch module (`load_module`), which the other runtimes convert from.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from workers.encoder.backend import cpu_has_bf16
from workers.protocol.errors import ConfigError, ModelError
from workers.protocol.model_info import ModelInfo

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str) -> torch.device:
    """auto (CUDA when visible), cpu, cuda or cuda:N; ConfigError for a CUDA device that is not there."""
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


def load_module(info: ModelInfo) -> torch.nn.Module:
    """The model folder as an eval-mode torch module on CPU; ModelError naming the folder if it cannot load."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(info.path, local_files_only=info.is_local).eval()
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"model {info.path!r}: cannot load ({first_line})") from error


class TorchBackend:
    """A transformers model on a torch device; pooling runs there too, in fp32."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device, uses_token_types: bool) -> None:
        self.model = model.to(device)
        self.device = device
        self.uses_token_types = uses_token_types

    def _autocast(self, dtype: str) -> contextlib.AbstractContextManager[object]:
        if dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_TORCH_DTYPES[dtype])

    def embed(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pooling: str,
        dtype: str,
        pool_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        inputs = {
            "input_ids": torch.from_numpy(input_ids).to(self.device),
            "attention_mask": torch.from_numpy(attention_mask).to(self.device),
        }
        if self.uses_token_types:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        with torch.inference_mode(), self._autocast(dtype):
            hidden = self.model(**inputs).last_hidden_state
        # Pooling in fp32 whatever the forward ran in.
        hidden = hidden.float()
        pooling_mask = inputs["attention_mask"] if pool_mask is None else torch.from_numpy(pool_mask).to(self.device)
        attention = pooling_mask.unsqueeze(-1).to(hidden.dtype)
        if pooling == "cls":
            # The first token pooling may use (not the first one when a prompt is left out), as sentence-transformers.
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), pooling_mask.argmax(1)]
        elif pooling == "mean":
            pooled = (hidden * attention).sum(1) / attention.sum(1).clamp(min=1e-9)
        else:
            pooled = hidden.masked_fill(attention == 0, -1e9).max(1).values
        return pooled.cpu().numpy()

    def release_cache(self) -> None:
        """Give cached GPU blocks back (after an out-of-memory error, before retrying smaller)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


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
