"""The OpenVINO runtime on CPU: the model converted to OpenVINO IR once (cached), f32 or native bf16.

OpenVINO's Core starts a TBB thread pool, which must never exist in a prefork parent: this module is
imported, and its Core built, only by `load`, which runs in the pool child (workers/runtime.py).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from workers.encoder.backend import pool_numpy
from workers.encoder.convert import converted, export_wrapper
from workers.protocol.model_info import ModelInfo

_PRECISION = {"fp32": "f32", "bf16": "bf16"}
_IR = "model.xml"
#: Compile-time properties besides precision and threads, each for a measured reason.
COMPILE_PROPERTIES: dict[str, Any] = {
    # One stream: a child never runs more than its share of the cores.
    "NUM_STREAMS": 1,
    "PERFORMANCE_HINT": "LATENCY",
    # Pinning would put every child's threads on the same first cores.
    "ENABLE_CPU_PINNING": False,
    # No int8 dynamic quantisation of activations: fp32 must stay exact.
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
}
#: The CPU plugin keeps compiled kernels per input shape (5,000 by default), and token-budget batches have a new
#: shape nearly every time. bf16 (AMD EPYC, one process, 200 chunks of 64 fortunes, one thread): RSS grew 271 MB per
#: 100 chunks with the default and 0.0 MB with no cache, at the same docs/s (73 vs 75), so bf16 keeps none. fp32
#: (Intel Xeon, one thread, 700 chunks of 24): a small cache, which the six layers' same-shaped nodes share within
#: a batch, ran 41.9 against 38.2 docs/s side by side, RSS flat at 331-332 MB from chunk 100 to 600 (406-407 with
#: none), and whole commands on 6,000 fortunes 192.7 against 183.3 docs/s (five alternating pairs, 4 won).
RUNTIME_CACHE_CAPACITY = {"fp32": 16, "bf16": 0}


def _build_ir(info: ModelInfo, uses_token_types: bool) -> Any:
    def build(folder: Path) -> None:
        import openvino as ov
        import torch

        module, example = export_wrapper(info, uses_token_types)
        with torch.inference_mode():
            model = ov.convert_model(module, example_input=example)
        # Weights stay f32 on disk (the default would halve them to f16, which is not exact).
        ov.save_model(model, str(folder / _IR), compress_to_fp16=False)

    return build


class OpenVinoBackend:
    """One OpenVINO model, compiled per dtype on first use, with one infer request per calling thread."""

    name = "openvino"

    def __init__(self, core: Any, model: Any, threads: int, uses_token_types: bool) -> None:
        self._core = core
        self._model = model
        self._threads = threads
        self.uses_token_types = uses_token_types
        self._compiled: dict[str, Any] = {}
        self._lock = threading.Lock()
        # The threads pool calls from several threads: an infer request is not to be shared, the compiled
        # model is; so each thread gets its own request per dtype.
        self._local = threading.local()

    @classmethod
    def load(cls, info: ModelInfo, threads: int, uses_token_types: bool, cache_dir: str = "") -> OpenVinoBackend:
        import openvino as ov

        options = {"token_type_ids": uses_token_types, "compress_to_fp16": False}
        folder = converted(info, "openvino", ov.get_version(), options, _build_ir(info, uses_token_types), cache_dir)
        core = ov.Core()
        return cls(core, core.read_model(str(folder / _IR)), threads, uses_token_types)

    def _request(self, dtype: str) -> Any:
        requests: dict[str, Any] = self._local.__dict__.setdefault("requests", {})
        if dtype not in requests:
            with self._lock:
                if dtype not in self._compiled:
                    self._compiled[dtype] = self._core.compile_model(
                        self._model,
                        "CPU",
                        {
                            "INFERENCE_PRECISION_HINT": _PRECISION[dtype],
                            "INFERENCE_NUM_THREADS": self._threads,
                            "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_CAPACITY[dtype],
                            **COMPILE_PROPERTIES,
                        },
                    )
                requests[dtype] = self._compiled[dtype].create_infer_request()
        return requests[dtype]

    def embed(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pooling: str,
        dtype: str,
        pool_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_token_types:
            inputs["token_type_ids"] = np.zeros_like(input_ids)
        request = self._request(dtype)
        hidden = request.infer(inputs)[0]
        # The output tensor is the request's own memory, reused by its next call: pool it before returning.
        return pool_numpy(
            np.asarray(hidden, dtype=np.float32), attention_mask if pool_mask is None else pool_mask, pooling
        )
