"""Tokenizer + model behind one interface, whatever runs the forward pass (torch, OpenVINO, ONNX Runtime).

`Encoder.load(info, device, runtime=...)` then `encode(texts) -> EncodeResult`; knows nothing of Celery.
Modules: `core` (tokenize once, length-sort, pack, normalise, restore order), `backend` (the backend
interface and which runtime runs), one module per runtime, and `convert` (the on-disk conversion cache).
"""

from workers.encoder.backend import RUNTIMES, choose_runtime, cpu_has_bf16
from workers.encoder.core import Encoder, EncodeResult
from workers.encoder.torch_backend import (
    configure_threads,
    import_model_classes,
    is_out_of_memory,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "RUNTIMES",
    "EncodeResult",
    "Encoder",
    "choose_runtime",
    "configure_threads",
    "cpu_has_bf16",
    "import_model_classes",
    "is_out_of_memory",
    "resolve_device",
    "resolve_dtype",
]
