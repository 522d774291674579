"""The ONNX Runtime on CPU: the model exported to ONNX once (cached, opset 17), fp32 only.

An InferenceSession starts ONNX Runtime's intra-op thread pool, which must never exist in a prefork
parent: this module is imported, and its session built, only by `load`, in the pool child.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workers.encoder.backend import pool_numpy
from workers.encoder.convert import converted, export_wrapper
from workers.protocol.model_info import ModelInfo

_ONNX = "model.onnx"
OPSET = 17


def _build_onnx(info: ModelInfo, uses_token_types: bool) -> Any:
    def build(folder: Path) -> None:
        import torch

        module, example = export_wrapper(info, uses_token_types)
        names = list(example)
        with torch.inference_mode():
            torch.onnx.export(
                module,
                tuple(example.values()),
                str(folder / _ONNX),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes={name: {0: "rows", 1: "tokens"} for name in [*names, "last_hidden_state"]},
                opset_version=OPSET,
                dynamo=False,  # the TorchScript exporter: no onnxscript rewrite, exact for BERT-family graphs
            )

    return build


class OnnxRuntimeBackend:
    """One InferenceSession; `run` is safe to call from several threads at once (ONNX Runtime's guarantee)."""

    name = "onnxruntime"

    def __init__(self, session: Any, uses_token_types: bool) -> None:
        self._session = session
        self.uses_token_types = uses_token_types

    @classmethod
    def load(cls, info: ModelInfo, threads: int, uses_token_types: bool, cache_dir: str = "") -> OnnxRuntimeBackend:
        import onnxruntime as ort

        options = {"token_type_ids": uses_token_types, "opset": OPSET}
        build = _build_onnx(info, uses_token_types)
        folder = converted(info, "onnxruntime", ort.__version__, options, build, cache_dir)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = 1
        # The arena and memory patterns keep buffers per batch shape, and shapes change with every batch:
        # without them RSS stays flat over a long job.
        session_options.enable_cpu_mem_arena = False
        session_options.enable_mem_pattern = False
        session = ort.InferenceSession(str(folder / _ONNX), session_options, providers=["CPUExecutionProvider"])
        return cls(session, uses_token_types)

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
        (hidden,) = self._session.run(["last_hidden_state"], inputs)
        return pool_numpy(hidden, attention_mask if pool_mask is None else pool_mask, pooling)
