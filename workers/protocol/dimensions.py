"""Matryoshka `dimensions`: how many leading components of a vector a request keeps.

Checked by the producer before anything is sent (a clear 400 / exit 2) and again by the worker, which
does the cut itself so that the stored results, and the bytes sent back, are already the smaller width.
"""

from __future__ import annotations

from workers.protocol.errors import ConfigError


class DimensionsUnsupported(ConfigError):
    """Raised when a request asks for more dimensions than the model makes, or fewer than one."""


def check_dimensions(dimensions: object, width: int, model: str) -> int | None:
    """`dimensions` as an int (None: the model's own width); DimensionsUnsupported unless 1..width.

    `width` 0 means "not known here" (a light client before its first result): only the lower bound is checked.
    """
    if dimensions is None:
        return None
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
        raise DimensionsUnsupported(f"dimensions {dimensions!r:.40}: must be a whole number of at least 1")
    if width and dimensions > width:
        raise DimensionsUnsupported(
            f"dimensions {dimensions}: model {model} makes {width}-dimensional vectors; ask for 1 to {width}"
        )
    return dimensions
