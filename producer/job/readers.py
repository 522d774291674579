"""Corpus readers: stream records from .txt, .jsonl, .csv, .parquet or stdin, validating each one.

Each reader yields `Record` (a valid text with its id) or `Rejected` (line and reason); nothing is
read whole into memory. What to do with a rejected record (fail or skip) is the caller's choice.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from workers.protocol.errors import InputError

FORMATS = ("auto", "txt", "jsonl", "csv", "parquet")


@dataclass(frozen=True)
class Record:
    """A valid input: its line number (1-based), its id and its text."""

    line: int
    id: str
    text: str


@dataclass(frozen=True)
class Rejected:
    """An input that cannot be embedded, and why."""

    line: int
    reason: str
    raw: str


def check_text(value: Any, field: str) -> str | None:
    """The reason `value` is not an embeddable text, or None when it is fine."""
    if value is None:
        return f"field {field!r} is missing or null"
    if not isinstance(value, str):
        return f"field {field!r} must be a string, got {type(value).__name__}"
    for char in value:
        if "\ud800" <= char <= "\udfff":
            return f"field {field!r} contains a lone surrogate (U+{ord(char):04X}); it is not valid Unicode text"
    return None


def detect_format(path: str, requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in FORMATS:
            raise InputError(f"--format {requested!r}: choose txt, jsonl, csv or parquet", source=path)
        if requested == "parquet" and path == "-":
            raise InputError(
                "--format parquet: Parquet is read from its footer, so pass a file, not stdin", source=path
            )
        return requested
    lower = path.lower()
    for suffix, fmt in (
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
        (".json", "jsonl"),
        (".csv", "csv"),
        (".txt", "txt"),
        (".parquet", "parquet"),
    ):
        if lower.endswith(suffix):
            return fmt
    if path == "-":
        return "auto-stdin"
    raise InputError("unknown input type: name it .txt, .jsonl, .csv or .parquet, or pass --format", source=path)


def open_input(path: str) -> IO[bytes]:
    """The input as a binary stream; a clear InputError when the file is missing or unreadable."""
    if path == "-":
        return sys.stdin.buffer
    if not os.path.exists(path):
        raise InputError("no such file", source=path)
    if os.path.isdir(path):
        raise InputError("is a directory, not a file", source=path)
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as error:
        raise InputError(f"cannot open ({error.strerror})", source=path) from error


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, str | None, bytes]]:
    """(line number, decoded text or None when not UTF-8, raw bytes), newline stripped."""
    for number, raw in enumerate(stream, start=1):
        raw = raw.rstrip(b"\n").rstrip(b"\r")
        try:
            yield number, raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            yield number, None, raw


def _preview(raw: bytes | str, limit: int = 200) -> str:
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    return text if len(text) <= limit else text[:limit] + "…"


def read_txt(stream: IO[bytes]) -> Iterator[Record | Rejected]:
    """One document per line; an empty line is an empty document, embedded like any other."""
    for number, text, raw in _lines(stream):
        if text is None:
            yield Rejected(number, "line is not valid UTF-8", _preview(raw))
        else:
            yield Record(number, str(number), text)


def read_jsonl(stream: IO[bytes], text_field: str, id_field: str) -> Iterator[Record | Rejected]:
    """One JSON object per line with a string `text_field`; `id_field` defaults to the line number."""
    for number, text, raw in _lines(stream):
        if text is None:
            yield Rejected(number, "line is not valid UTF-8", _preview(raw))
            continue
        if not text.strip():
            continue  # blank lines separate nothing in JSONL; skipping them loses no record
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as error:
            yield Rejected(number, f"not valid JSON ({error.msg} at column {error.colno})", _preview(text))
            continue
        if not isinstance(obj, dict):
            yield Rejected(number, f"expected a JSON object, got {type(obj).__name__}", _preview(text))
            continue
        reason = check_text(obj.get(text_field), text_field)
        if reason:
            yield Rejected(number, reason, _preview(text))
            continue
        record_id = obj.get(id_field, number)
        yield Record(number, str(record_id), obj[text_field])


def read_csv(stream: IO[bytes], text_field: str, id_field: str) -> Iterator[Record | Rejected]:
    """A header row, then one record per row; line numbers count the header as line 1."""
    # surrogateescape keeps going past bad bytes, so that one bad row is rejected, not the file.
    text_stream = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.DictReader(text_stream)
    if reader.fieldnames is None:
        return
    if text_field not in reader.fieldnames:
        raise InputError(f"no column {text_field!r} (columns: {', '.join(reader.fieldnames)}); pass --text-field")
    for row in reader:
        number = reader.line_num
        value = row.get(text_field)
        if isinstance(value, str) and any("\udc80" <= c <= "\udcff" for c in value):
            yield Rejected(number, "row is not valid UTF-8", _preview(value))
            continue
        reason = check_text(value, text_field)
        if reason:
            yield Rejected(number, reason, _preview(str(row)))
            continue
        yield Record(number, str(row.get(id_field) or number), value)  # type: ignore[arg-type]


def read_parquet(path: str, text_field: str, id_field: str) -> Iterator[Record | Rejected]:
    """A text column and an id column, a record batch at a time; a null id is the row number."""
    from producer.job.parquet_input import parquet_rows

    for number, text, record_id in parquet_rows(path, text_field, id_field):
        reason = check_text(text, text_field)
        if reason:
            yield Rejected(number, reason, _preview(repr(text)))
        else:
            yield Record(number, str(number) if record_id is None else str(record_id), text)


def read_records(
    path: str, *, fmt: str = "auto", text_field: str = "text", id_field: str = "id"
) -> Iterator[Record | Rejected]:
    """Stream records from `path` (or stdin for '-'), whatever its format."""
    chosen = detect_format(path, fmt)
    if chosen == "parquet":
        open_input(path).close()  # the same one-line errors as other formats for a missing file
        yield from read_parquet(path, text_field, id_field)
        return
    stream = open_input(path)
    try:
        if chosen == "auto-stdin":
            first = stream.peek(1)[:1] if hasattr(stream, "peek") else b""
            chosen = "jsonl" if first == b"{" else "txt"
        if chosen == "txt":
            yield from read_txt(stream)
        elif chosen == "jsonl":
            yield from read_jsonl(stream, text_field, id_field)
        else:
            yield from read_csv(stream, text_field, id_field)
    except InputError as error:
        if error.source:
            raise
        raise InputError(error.reason, source=path, line=error.line) from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def count_lines(path: str, fmt: str = "auto") -> int | None:
    """Lines (Parquet: rows) in a regular file, for the progress bar's ETA; None for stdin (unknown)."""
    if path == "-" or not os.path.isfile(path):
        return None
    if detect_format(path, fmt) == "parquet":
        from producer.job.parquet_input import count_rows

        return count_rows(path)
    count = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
    return count
