"""What every `embedq` subcommand shares: the model flags, the settings they make, the default pool size, a
line on stderr. Kept apart from producer/cli/main.py so that each subcommand's module can import it."""

from __future__ import annotations

import argparse
import os
import sys

from workers.protocol.config import DTYPES, RUNTIMES, Settings
from workers.protocol.errors import ConfigError


def default_workers() -> int:
    """Pool children for a local job: one per core (measured best on 2 cores; see README, Performance)."""
    return max(1, len(os.sched_getaffinity(0)))


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype, --batch-tokens and --runtime: what a command asks of the workers."""
    parser.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model folder or hub name, or with --broker a model the fleet serves "
        "(default: the packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="fp32 (exact, default), bf16/fp16 autocast, or auto (bf16 where the hardware has it)",
    )
    parser.add_argument(
        "--batch-tokens", type=int, default=None, help="padded tokens per forward batch (default: 2048, at least 16)"
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=None,
        help="inference runtime of the workers this command starts (default auto: the fastest exact one on CPU)",
    )


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """EMBEDQ_* settings with the flags applied; a bad flag value is reported under the flag's own name."""
    settings = Settings.from_env(environ)
    for flag, name in (
        ("broker", "broker_url"),
        ("model", "model"),
        ("dtype", "dtype"),
        ("batch_tokens", "batch_tokens"),
        ("runtime", "runtime"),
    ):
        value = getattr(args, flag, None)
        if value is None:
            continue
        try:
            settings = settings.replace(**{name: value})
        except ConfigError as error:
            # Settings speak of EMBEDQ_X=value (their own source); the user typed --x value.
            reason = str(error).split(": ", 1)[-1]
            raise ConfigError(f"--{flag.replace('_', '-')} {value}: {reason}") from None
    return settings


def say(line: str) -> None:
    """One line on stderr, prefixed with the command's name."""
    print(f"embedq: {line}", file=sys.stderr, flush=True)
