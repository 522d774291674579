"""The one interface every inference runtime implements, and which runtime a worker runs.

A backend takes one padded batch (token ids and attention mask, int64, rows x longest) and returns
its pooled, not yet normalised, float32 vectors. Tokenizing, length-sorting, packing under the token
budget, normalising and restoring input order are the encoder's (workers/encoder/core.py), the same
for every runtime. Nothing here imports a runtime: choosing one is safe in a prefork parent.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Protocol

import numpy as np

from workers.protocol.config import RUNTIMES
from workers.protocol.errors import ConfigError

#: The Python package each runtime needs.
PACKAGES = {"torch": "torch", "openvino": "openvino", "onnxruntime": "onnxruntime"}
#: What each runtime can run on CPU: ONNX Runtime's CPU provider has no bf16 kernels worth using.
DTYPES = {"torch": ("fp32", "bf16"), "openvino": ("fp32", "bf16"), "onnxruntime": ("fp32",)}
#: `auto` on CPU: the fastest runtime that meets the bar (fp32 min cosine >= 0.99999 against sentence-transformers,
#: bf16 >= 0.9999), measured on all-MiniLM-L6-v2, 6,000 fortunes, 2 threads, 2,048-token batches (bench/results.md):
#: fp32 OpenVINO 362 > torch 166 > ONNX Runtime 140 docs/s, all exact; bf16 (native) OpenVINO 599 > torch autocast
#: 355 docs/s. OpenVINO's bf16 was first excluded (worst row 0.999879), until the attention scale was folded into
#: the query weights at conversion (convert.fold_attention_scale): worst row 0.999951.
AUTO_ORDER = {"fp32": ("openvino", "onnxruntime", "torch"), "bf16": ("openvino", "torch")}


class Backend(Protocol):
    """One loaded model in one inference runtime, owned by one process."""

    #: The runtime's name, as in RUNTIMES.
    name: str

    def embed(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pooling: str,
        dtype: str,
        pool_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Pooled float32 vectors (rows x dim) of one padded batch, run in `dtype` (fp32, bf16 or fp16).

        `pool_mask`, when given, is the mask pooling uses instead of the attention mask: a prompt's tokens
        take part in attention but not in the pooled vector (sentence-transformers' `include_prompt=False`).
        """
        ...


@functools.cache
def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX), where bf16 pays off (read once per process)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return False
    words = set(flags.split())
    return bool({"avx512_bf16", "amx_bf16"} & words)


def installed(runtime: str) -> bool:
    """Whether the runtime's package is importable, found without importing it (no thread pool starts)."""
    return importlib.util.find_spec(PACKAGES[runtime]) is not None


def choose_runtime(requested: str, device_type: str, dtype: str) -> str:
    """The runtime that runs `dtype` on `device_type` for EMBEDQ_RUNTIME=`requested`; ConfigError if none can.

    `auto` takes the fastest installed exact runtime on CPU, and torch on CUDA. On a CPU without native bf16,
    OpenVINO would quietly run bf16 in f32, so `auto` sends bf16 to torch (whose autocast is what the user asked
    for), and an explicit `openvino` refuses it.
    """
    if requested not in RUNTIMES:
        raise ConfigError(f"EMBEDQ_RUNTIME={requested!r}: choose one of {', '.join(RUNTIMES)}")
    if device_type != "cpu":
        if requested not in ("auto", "torch"):
            raise ConfigError(f"EMBEDQ_RUNTIME={requested}: runs on CPU only; on {device_type} use torch or auto")
        return "torch"
    if requested == "auto":
        if dtype != "fp32" and not cpu_has_bf16():
            return "torch"
        return next((name for name in AUTO_ORDER.get(dtype, ()) if installed(name)), "torch")
    if dtype not in DTYPES[requested]:
        raise ConfigError(
            f"EMBEDQ_RUNTIME={requested} runs {', '.join(DTYPES[requested])} only, not dtype {dtype}: "
            "use dtype fp32, or EMBEDQ_RUNTIME=auto"
        )
    if requested == "openvino" and dtype == "bf16" and not cpu_has_bf16():
        raise ConfigError(
            "EMBEDQ_RUNTIME=openvino with dtype bf16 needs a CPU with native bf16 (avx512_bf16 or AMX), which this "
            "one lacks: use dtype fp32, or EMBEDQ_RUNTIME=auto (bf16 then runs on torch)"
        )
    if not installed(requested):
        raise ConfigError(
            f"EMBEDQ_RUNTIME={requested}: the package {PACKAGES[requested]} is not installed; "
            f"pip install {PACKAGES[requested]}, or use EMBEDQ_RUNTIME=auto"
        )
    return requested


def pool_numpy(hidden: np.ndarray, attention_mask: np.ndarray, pooling: str) -> np.ndarray:
    """cls, mean or max pooling of float32 token states (rows x tokens x dim), padding ignored.

    cls takes each row's first unmasked token, as sentence-transformers does: the first one, unless a
    prompt's tokens were masked out of pooling.
    """
    if pooling == "cls":
        first = attention_mask.argmax(axis=1)
        return np.ascontiguousarray(hidden[np.arange(hidden.shape[0]), first], dtype=np.float32)
    mask = attention_mask[:, :, None].astype(np.float32)
    if pooling == "mean":
        return (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return np.where(mask > 0, hidden, np.float32(-1e9)).max(1)
