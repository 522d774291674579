"""The `embedq` command line: the parser, `worker`, and one exit code per error type (`embed` is in embed.py;
`serve`, `up` and `status` in serve.py)."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from producer.cli import exitcodes
from producer.cli.args import Parser, positive_int
from producer.cli.common import add_model_flags, default_workers, say, settings_from
from producer.cli.embed import add_embed_command
from workers.protocol import extras
from workers.protocol.config import Settings
from workers.protocol.errors import (
    BrokerUnavailable,
    ConfigError,
    EmbedqError,
    InputError,
    InsufficientMemory,
    JobFailed,
    ModelError,
    NoWorkers,
    WorkersFailed,
)

log = logging.getLogger("embedq")

#: Error type -> exit code; the first match wins, so subclasses go first.
_EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (ConfigError, exitcodes.USAGE),
    (InputError, exitcodes.INPUT),
    (BrokerUnavailable, exitcodes.BROKER),
    (ModelError, exitcodes.MODEL),
    (InsufficientMemory, exitcodes.MODEL),
    (JobFailed, exitcodes.JOB_FAILED),
    (WorkersFailed, exitcodes.WORKERS),
    (NoWorkers, exitcodes.NO_WORKERS),
]


def _interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="embedq", description="BERT-family embeddings on Celery workers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    add_embed_command(sub)

    worker = sub.add_parser("worker", help="run a worker (a thin wrapper over `celery -A workers.app worker`)")
    add_model_flags(worker)
    worker.add_argument(
        "--broker", default=None, help="redis://… (default: EMBEDQ_BROKER_URL, else redis://127.0.0.1:6379/0)"
    )
    worker.add_argument("--concurrency", type=positive_int, default=None, help="pool children (default: one per core)")
    worker.add_argument(
        "--pool", choices=("prefork", "solo", "threads"), default="prefork", help="Celery pool: processes or threads"
    )
    worker.add_argument(
        "--start-method", choices=("fork", "spawn"), default=None, help="prefork start method (default: fork)"
    )
    worker.add_argument(
        "--queues",
        type=_queues,
        default="interactive,bulk",
        help="lanes in priority order; a model other than the packaged one gets its own queues, LANE.MODEL",
    )
    worker.add_argument(
        "-n",
        "--hostname",
        default=None,
        help="worker name (default: embedq@HOSTNAME, embedq-MODEL@HOSTNAME for another model than the packaged one)",
    )
    worker.add_argument(
        "--loglevel",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        default="INFO",
        help="Celery log level",
    )
    worker.set_defaults(func=cmd_worker)

    from producer.cli.serve import add_commands

    add_commands(sub, settings_from)  # serve, up, status
    return parser


def _queues(text: str) -> str:
    """--queues: a comma-separated list of embedq's own queues."""
    from workers.protocol.config import QUEUES

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in QUEUES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text}: choose from {', '.join(QUEUES)}, comma-separated")
    return ",".join(names)


def worker_argv(args: argparse.Namespace, settings: Settings) -> tuple[list[str], dict[str, str], str]:
    """The celery command, its environment, and the one line saying what was chosen."""
    from producer.local.cluster import worker_command
    from workers.runtime import threads_per_child

    pool = args.pool
    concurrency = 1 if pool == "solo" else (args.concurrency or settings.concurrency or default_workers())
    chosen = settings.replace(pool=pool, concurrency=concurrency)
    if args.start_method:
        chosen = chosen.replace(pool_start_method=args.start_method)
    threads = threads_per_child(chosen.replace(pool_concurrency=1 if pool == "threads" else concurrency))
    from workers.protocol.routing import node_name, worker_queues

    # --queues names lanes; the worker consumes its own model's queues for them (workers/protocol/routing.py).
    queues = worker_queues(chosen.model, args.queues.split(","))
    command = worker_command(
        concurrency, pool, hostname=args.hostname or node_name(chosen.model), loglevel=args.loglevel
    )
    command += ["-Q", ",".join(queues)]
    env = {**os.environ, **chosen.to_env()}
    line = (
        f"worker: pool {pool}{' (' + chosen.pool_start_method + ')' if pool == 'prefork' else ''}, "
        f"{concurrency} {'threads' if pool == 'threads' else 'children'} x {threads} torch threads, "
        f"dtype {chosen.dtype}, runtime {chosen.runtime}, queues {','.join(queues)}, "
        f"broker {chosen.broker_url.split('@')[-1]}"
    )
    return command, env, line


def cmd_worker(args: argparse.Namespace) -> int:
    extras.require("embedq worker", "worker")
    settings = settings_from(args)
    command, env, line = worker_argv(args, settings)
    say(line)
    os.execve(command[0], command, env)  # become celery: signals and exit codes are celery's own
    return exitcodes.OK  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="embedq: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    signal.signal(signal.SIGTERM, _interrupt)
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited ignore:
    # install the handler explicitly, so that Ctrl-C (or kill -INT) stops a backgrounded job too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        say("interrupted; stopped everything this command started")
        return exitcodes.INTERRUPTED
    except EmbedqError as error:
        say(f"error: {error}")
        return next((code for kind, code in _EXIT_CODES if isinstance(error, kind)), exitcodes.JOB_FAILED)
    except OSError as error:
        # Found only mid-job (a disk that fills up, a folder removed under us): still one line, no traceback.
        where = f"{error.filename}: " if error.filename else ""
        say(f"error: {where}{error.strerror or error}")
        return exitcodes.JOB_FAILED
    except Exception as error:  # the CLI's last line of defence: a bug still gets one line, -v shows the rest
        log.info("unexpected error", exc_info=True)
        say(f"error: unexpected {type(error).__name__}: {error} (run with -v for the traceback)")
        return exitcodes.JOB_FAILED


#: The code `run()` exits with once `main()` has returned (None until then).
_exit_code: int | None = None


def _exit_without_teardown() -> None:
    """The atexit handler `run()` installs first, so that it runs after every other one: flush and `os._exit`.

    Once the command has returned, every file it wrote is closed; what is left is Python's module teardown,
    0.15-0.19 s with numpy, celery and kombu loaded (measured after `embedq embed`), paid by every command.
    The workers skip it the same way (workers/lifecycle/teardown.py).
    """
    if _exit_code is None:  # main() raised (argparse's usage exit, a bug): the ordinary exit
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(_exit_code)


def run() -> None:
    """The `embedq` program: `main()` with sys.argv, then exit with its code without the interpreter's teardown."""
    global _exit_code
    atexit.register(_exit_without_teardown)
    _exit_code = main()
    sys.exit(_exit_code)


if __name__ == "__main__":
    run()
