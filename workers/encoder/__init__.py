"""Tokenizer + model behind one interface, whatever runs the forward pass (torch, OpenVINO, ONNX Runtime).

`Encoder.load(info, device, runtime=...)` then `encode(texts) -> EncodeResult`; knows nothing of Celery.
Modules: `core` (tokenize once, length-sort, pack, normalise, restore order), `backend` (the backend
interface and which runtime runs), `device` (device, dtype and threads, settled without torch),
`tokenizer` (the model's tokenizer, without transformers where that is checked to be exact), one module
per runtime, and `convert` (the on-disk conversion cache).
"""

from workers.encoder.backend import RUNTIMES, choose_runtime, cpu_has_bf16
from workers.encoder.core import Encoder, EncodeResult
from workers.encoder.device import configure_threads, is_out_of_memory, resolve_device, resolve_dtype

__all__ = [
    "RUNTIMES",
    "EncodeResult",
    "Encoder",
    "choose_runtime",
    "configure_threads",
    "cpu_has_bf16",
    "is_out_of_memory",
    "resolve_device",
    "resolve_dtype",
]
