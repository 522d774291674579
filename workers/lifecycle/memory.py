"""The memory guard: refuse to start children whose models would not fit, instead of being OOM-killed.

A model too big for the machine otherwise dies silently under the OOM killer, and the pool
respawns it forever. The estimate is read from file sizes and config.json, without torch, so the
worker main process can check before it forks a single child.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from workers.protocol.config import Settings
from workers.protocol.errors import InsufficientMemory
from workers.protocol.model_info import ModelInfo

#: What torch, transformers and the tokenizer cost a child before any weight is loaded.
RUNTIME_OVERHEAD_BYTES = 400 * 2**20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    activations_bytes: int

    @property
    def per_child_bytes(self) -> int:
        return self.weights_bytes + self.activations_bytes + RUNTIME_OVERHEAD_BYTES


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def estimate(model: ModelInfo, batch_tokens: int) -> MemoryEstimate:
    """Weights as stored (fp32 on CPU even under autocast) plus activations at the batch budget."""
    folder = Path(model.path)
    weights = sum(p.stat().st_size for p in folder.glob("*") if p.suffix in _WEIGHT_SUFFIXES) if folder.is_dir() else 0
    hidden, intermediate, heads = 768, 3072, 12
    config_path = folder / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        hidden = int(config.get("hidden_size") or config.get("dim") or hidden)
        intermediate = int(config.get("intermediate_size") or config.get("hidden_dim") or 4 * hidden)
        heads = int(config.get("num_attention_heads") or config.get("n_heads") or heads)
    # Under inference_mode only one layer's activations live at a time: hidden states, the FFN
    # intermediate, and attention scores (heads x longest^2 per row; at most heads x budget x max_len).
    # Each counted about twice (temporaries, allocator caching): all-MiniLM-L6-v2 at 2048 tokens
    # measured 130 MiB of activations for 120 MiB estimated, and 612 MiB peak RSS for 606 estimated.
    longest = min(model.max_length, batch_tokens)
    per_token = 4 * (12 * hidden + 3 * intermediate + 2 * heads * longest)
    return MemoryEstimate(weights, batch_tokens * per_token)


def measure_available_bytes() -> int:
    """Memory this process group may still use: the cgroup's limit less its usage, or MemAvailable."""
    candidates: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            raw_limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if raw_limit.isdigit() and int(raw_limit) < 2**60:
            candidates.append(int(raw_limit) - usage)
    return min(candidates) if candidates else 2**62


def gpu_free_bytes() -> int | None:
    """Free memory of the first GPU from nvidia-smi, or None without one.

    Asked of nvidia-smi rather than torch: initialising CUDA in the worker main process would break
    every child it forks.
    """
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(out.split()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def check_fits(
    model: ModelInfo, settings: Settings, children: int | None = None, *, available_bytes: int | None = None
) -> MemoryEstimate:
    """Raise InsufficientMemory, naming the numbers and what to change, when the children won't fit.

    `available_bytes`: the memory the children may use; None measures it (`measure_available_bytes()`).
    """
    children = children or settings.pool_concurrency or settings.concurrency or 1
    needed = estimate(model, settings.batch_tokens)
    total = needed.per_child_bytes * children
    available = measure_available_bytes() if available_bytes is None else available_bytes
    if total > available:
        fitting = available // needed.per_child_bytes
        hint = f"--concurrency {fitting} fits" if fitting else "not even one child fits"
        raise InsufficientMemory(
            f"model {model.name} needs about {_gib(needed.per_child_bytes)} per child "
            f"({_gib(needed.weights_bytes)} weights, {_gib(needed.activations_bytes)} activations at "
            f"--batch-tokens {settings.batch_tokens}, {_gib(RUNTIME_OVERHEAD_BYTES)} runtime) x {children} "
            f"children = {_gib(total)}, but only {_gib(available)} is available: use fewer children "
            f"({hint}), a smaller --batch-tokens, "
            "or a smaller model"
        )
    if settings.device != "cpu":
        gpu_free = gpu_free_bytes()
        on_gpu = (needed.weights_bytes + needed.activations_bytes) * children
        if gpu_free is not None and on_gpu > gpu_free:
            raise InsufficientMemory(
                f"model {model.name} needs about {_gib(on_gpu)} of GPU memory for {children} children, but the "
                f"GPU has {_gib(gpu_free)} free: use fewer children (--concurrency), a smaller --batch-tokens, "
                "--dtype bf16, or a smaller model"
            )
    return needed
