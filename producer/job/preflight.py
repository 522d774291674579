"""Checks the command line runs before it sends any task, so that a mistake costs a second.

The embedded default starts its workers before the checks that read the input or probe the output folder
(producer/cli/embed.py), so that they boot meanwhile; an error stops them again.

Each raises an EmbedqError whose message names the flag and value the user typed and what to change.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from workers.protocol.config import Settings
from workers.protocol.errors import ConfigError, InputError, NoWorkers
from workers.protocol.keys import redact

#: Headroom on top of the estimated output size (resume log, ids, manifest).
_SPACE_MARGIN_BYTES = 1 << 20


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_output(output: str, *, rows_hint: int, dim: int, precision: str = "float32") -> None:
    """-o must name a file that can be written, in a folder (or a folder to create) with room for it."""
    from producer.job.output import output_kind

    try:
        kind = output_kind(output)
    except ValueError:
        raise ConfigError(f"-o {output}: name the output .npy or .parquet") from None
    target = Path(output)
    if target.is_dir():
        raise ConfigError(f"-o {output}: is a folder; name a file in it, e.g. {target / 'vectors.npy'}")
    folder = _nearest_existing(target.parent if str(target.parent) else Path("."))
    if not folder.is_dir():
        raise ConfigError(f"-o {output}: {folder} is a file, not a folder; choose another output path")
    try:
        # os.access says yes for root on read-only or virtual file systems (/sys, /proc): try for real.
        handle, probe = tempfile.mkstemp(prefix=".embedq-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(
            f"-o {output}: cannot write in {folder} ({error.strerror}); choose a folder you can write to"
        ) from None
    # The rows are written once as float32; Parquet or a quantised .npy is written next to them before
    # they are removed (a float32 .npy is the partial file renamed).
    from producer.job.quantize import output_dtype, output_width

    partial = rows_hint * dim * 4
    final = rows_hint * output_width(precision, dim) * output_dtype(precision).itemsize
    need = partial + (final if kind == "parquet" or precision != "float32" else 0) + _SPACE_MARGIN_BYTES
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    if free < need:
        raise ConfigError(
            f"-o {output}: {free / 1e6:.1f} MB free in {folder}, the output needs about {need / 1e6:.1f} MB; "
            "free some space or choose another folder"
        )


def check_first_records(input_path: str, *, fmt: str, text_field: str, id_field: str, limit: int) -> None:
    """With --on-invalid fail, a bad record among the first `limit` stops here, before any task is sent.

    Later records are still checked as the job streams them (producer/job/runner.py, same message); stdin
    cannot be read twice, so it is left to the job.
    """
    from producer.job.readers import Rejected, read_records

    if input_path == "-":
        return
    records = read_records(input_path, fmt=fmt, text_field=text_field, id_field=id_field)
    try:
        for count, item in enumerate(records, start=1):
            if isinstance(item, Rejected):
                raise InputError(
                    f"{item.reason} (use --on-invalid skip to set such records aside)",
                    source=input_path,
                    line=item.line,
                )
            if count >= limit:
                return
    finally:
        records.close()  # type: ignore[attr-defined]


def check_results(spec: str) -> None:
    """--results disk:PATH must be a folder, or a new one in a folder that exists (nothing else is created)."""
    if not spec.startswith("disk:"):
        return
    path = Path(spec[len("disk:") :])
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"--results {spec}: {path} is a file; name a folder")
        return
    if not path.parent.is_dir():
        raise ConfigError(
            f"--results {spec}: {path.parent} does not exist; create it first (workers and this command must see it)"
        )


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Each (flag -> port) must be free on `host`; the first one taken names its flag."""
    for flag, number in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            # uvicorn, Flower and Valkey set SO_REUSEADDR too: a port in TIME_WAIT is not "in use".
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, number))
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"{flag} {number}: {host}:{number} is already in use; pick another with {flag}"
                    ) from None
                raise ConfigError(f"{flag} {number}: cannot listen on {host}:{number} ({error.strerror})") from None


def wait_for_consumers(
    settings: Settings, queue: str, *, wait_s: float, say: Callable[[str], None], grace_s: float = 3.0
) -> list[str]:
    """The workers consuming `queue`, asked over Celery's control channel; NoWorkers once none answered in time.

    `grace_s` covers a worker that is just starting; `wait_s` (--wait-for-workers) extends it on purpose.
    """
    from producer.job.broker import sender_app

    app = sender_app(settings)
    deadline = time.monotonic() + max(wait_s, grace_s)
    announced = False
    try:
        while True:
            replies = app.control.inspect(timeout=1.0).active_queues() or {}
            consumers = sorted(
                host for host, queues in replies.items() if any(q.get("name") == queue for q in queues or [])
            )
            if consumers:
                return consumers
            if wait_s > grace_s and not announced:
                say(f"waiting up to {wait_s:g} s for a worker to consume {queue!r} on {redact(settings.broker_url)}")
                announced = True
            if time.monotonic() >= deadline:
                others = f" (workers {', '.join(sorted(replies))} consume other queues)" if replies else ""
                prefix = (
                    f" (key prefix {settings.key_prefix!r})" if settings.key_prefix != Settings().key_prefix else ""
                )
                raise NoWorkers(
                    f"no worker consumes queue {queue!r} on {redact(settings.broker_url)}{prefix}{others}; start one "
                    f"(embedq worker --broker URL), or pass --wait-for-workers SECONDS to wait for it"
                )
    finally:
        app.close()
