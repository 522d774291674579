"""The torch runtime: eager PyTorch under inference_mode, fp32 or bf16/fp16 autocast; the CUDA path.

Also where a model folder becomes a torch module (`load_module`), which the other runtimes convert from.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from workers.protocol.errors import ModelError
from workers.protocol.model_info import ModelInfo

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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

    def __init__(self, model: torch.nn.Module, device: str, uses_token_types: bool, threads: int) -> None:
        # Set here, not at import: torch may be imported late (a fallback from another runtime).
        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        self.model = model.to(self.device)
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
