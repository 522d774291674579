"""Quantised output: int8/uint8 with one calibration per job, and bit-packed binary/ubinary.

Every function reproduces sentence-transformers' `quantize_embeddings` bit for bit:
- int8/uint8: per-dimension ranges (min and max over the calibration rows), 255 steps between them,
  `clip(floor((x - min) / step), 0, 255)`, offset by -128 for int8; a dimension whose min equals its
  max gets a step of 1;
- binary/ubinary: `np.packbits(x > 0)` along each row (8 dimensions per byte, the last byte padded
  with zeros), offset by -128 to int8 for binary.

A corpus job calibrates on *all* its rows (producer/job/output.py reads them twice, in blocks, so
the matrix is never whole in memory), so every row shares one scale; the ranges go into the
manifest, and `quantize_queries` applies them to query vectors later.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
#: The precisions whose scale comes from calibration ranges.
CALIBRATED = ("int8", "uint8")


def check_precision(precision: str) -> None:
    """ValueError naming the choices unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


def output_dtype(precision: str) -> np.dtype[Any]:
    """The element type of the output for `precision`."""
    check_precision(precision)
    if precision == "float32":
        return np.dtype("<f4")
    return np.dtype(np.int8) if precision in ("int8", "binary") else np.dtype(np.uint8)


def output_width(precision: str, dim: int) -> int:
    """Columns of the output: `dim`, or one byte per 8 dimensions (rounded up) when bit-packed."""
    return (dim + 7) // 8 if precision.endswith("binary") else dim


def calibration_ranges(blocks: Iterable[np.ndarray], dim: int) -> np.ndarray:
    """(2, dim) float32: per-dimension min and max over every row of `blocks`, read once.

    Min and max are exact whatever the blocking, so this equals sentence-transformers' ranges computed
    on the whole matrix at once. No rows gives zeros (nothing is quantised with them).
    """
    low = np.full(dim, np.inf, dtype=np.float32)
    high = np.full(dim, -np.inf, dtype=np.float32)
    seen = False
    for block in blocks:
        if block.shape[0]:
            np.minimum(low, block.min(axis=0), out=low)
            np.maximum(high, block.max(axis=0), out=high)
            seen = True
    if not seen:
        return np.zeros((2, dim), dtype=np.float32)
    return np.vstack((low, high))


def quantize(embeddings: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 embeddings at `precision`; int8/uint8 need `ranges` (from `calibration_ranges`).

    The arithmetic is sentence-transformers' own, in float32, done in place to keep one temporary.
    """
    check_precision(precision)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if precision == "float32":
        return embeddings
    if precision in CALIBRATED:
        if ranges is None:
            raise ValueError(f"precision {precision!r} needs calibration ranges")
        ranges = np.asarray(ranges, dtype=np.float32)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        values = np.subtract(embeddings, starts)
        np.divide(values, steps, out=values)
        np.floor(values, out=values)
        np.clip(values, 0, 255, out=values)
        if precision == "uint8":
            return values.astype(np.uint8)
        values -= 128
        return values.astype(np.int8)
    packed = np.packbits(embeddings > 0, axis=-1)
    if precision == "ubinary":
        return packed
    return (packed - 128).astype(np.int8)


def dequantize(values: np.ndarray, precision: str, ranges: np.ndarray) -> np.ndarray:
    """int8/uint8 rows back on the float scale (float64), as sentence-transformers rescoring does.

    Each value becomes the lower edge of its step: `min + (q [+ 128 for int8]) * step`; comparing a float
    query with these rows loses far less than comparing quantised query and rows (README, "Performance").
    """
    if precision not in CALIBRATED:
        raise ValueError(f"only int8 and uint8 rows can be dequantised, not {precision!r}")
    ranges = np.asarray(ranges, dtype=np.float32)
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    restored = np.asarray(values).astype(np.float64)  # before the offset: int8 + 128 would overflow
    if precision == "int8":
        restored += 128
    return restored * steps + ranges[0]


def manifest_fields(precision: str, ranges: np.ndarray | None) -> dict[str, Any]:
    """What the manifest records so that a query can be quantised the same way later."""
    fields: dict[str, Any] = {"precision": precision}
    if precision in CALIBRATED and ranges is not None:
        # float32 -> Python float -> JSON -> float32 is exact: the query gets the very same scale.
        fields["ranges"] = ranges.astype(np.float32).tolist()
    return fields


def quantize_queries(queries: np.ndarray, manifest: Mapping[str, Any] | str | Path) -> np.ndarray:
    """Query embeddings (float32, as the same model gives them) quantised as the job's corpus was.

    `manifest` is OUTPUT.manifest.json (a path) or its parsed content. For int8/uint8 the job's ranges
    are used, never ranges of the queries themselves, so query and corpus share one scale.
    """
    fields: Mapping[str, Any]
    if isinstance(manifest, Mapping):
        fields = manifest
    else:
        with open(manifest, encoding="utf-8") as handle:
            fields = json.load(handle)
    precision = str(fields.get("precision", "float32"))
    ranges = fields.get("ranges")
    if precision in CALIBRATED and ranges is None:
        raise ValueError(f"the manifest says precision {precision!r} but records no ranges")
    return quantize(queries, precision, None if ranges is None else np.asarray(ranges, dtype=np.float32))
