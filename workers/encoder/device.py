"""Which device and dtype a worker runs, and with how many threads, decided without importing torch.

A pool child that runs OpenVINO or ONNX Runtime on CPU never needs torch: importing it (2 s here) was
most of such a child's start. So the device is settled from the machine first; torch is imported only
where CUDA may be there (an NVIDIA device node, WSL's /dev/dxg, or Windows, which has no /dev to look
at), or when the torch runtime itself runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from workers.encoder.backend import cpu_has_bf16
from workers.protocol.errors import ConfigError

#: Set by `configure_threads`: what every backend of this process uses unless told otherwise.
_configured_threads: int | None = None


def cuda_possible() -> bool:
    """False only where CUDA certainly is not: Linux or macOS without an NVIDIA (or WSL GPU) device node."""
    if os.name == "nt":
        return True
    dev = Path("/dev")
    return any((dev / name).exists() for name in ("nvidiactl", "nvidia0", "dxg"))


def resolve_device(requested: str) -> str:
    """auto (CUDA when visible), cpu, cuda or cuda:N, as a torch device string; ConfigError for a missing GPU."""
    if requested == "cpu":
        return "cpu"
    if requested == "auto" and not cuda_possible():
        return "cpu"
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r}: no CUDA device is visible to this worker; use cpu or auto")
    return str(torch.device(requested))


def device_type(device: str) -> str:
    """'cpu' or 'cuda' for a device string such as 'cuda:1'."""
    return device.split(":", 1)[0]


def resolve_dtype(requested: str, device: str) -> str:
    """Map auto|fp32|bf16|fp16 to what this device runs: fp32 is exact, the others are faster."""
    if requested == "auto":
        if device_type(device) == "cuda":
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if requested == "fp16" and device_type(device) == "cpu":
        raise ConfigError("dtype fp16 is for GPUs; on CPU use bf16 (or auto)")
    return requested


def bf16_emulated(dtype: str, device: str) -> bool:
    """bf16 asked for on a CPU without native bf16: it still runs as asked (torch autocast), but emulated,
    several times slower than exact fp32 on the same CPU (bench/results.md), which nobody asks bf16 for."""
    return dtype == "bf16" and device_type(device) == "cpu" and not cpu_has_bf16()


def configure_threads(threads: int) -> None:
    """Give this process `threads` intra-op threads (torch's too, now or when it is imported later)."""
    global _configured_threads
    _configured_threads = max(1, threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_configured_threads)


def default_threads() -> int:
    """Threads a backend uses when not told: what `configure_threads` set, else every core this process may use."""
    if _configured_threads is not None:
        return _configured_threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA out-of-memory, however this torch version spells it (and without importing torch to ask)."""
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(error, oom_type)) or "out of memory" in str(error).lower()
