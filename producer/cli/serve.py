"""The serving and operating subcommands of `embedq`: `serve`, `up` and `status`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from producer.cli import exitcodes
from producer.cli.args import non_negative_int, port, positive_float, positive_int
from workers.protocol import extras
from workers.protocol.config import Settings
from workers.protocol.errors import BrokerUnavailable, ConfigError

SettingsFrom = Callable[[argparse.Namespace], Settings]


def add_commands(sub: Any, settings_from: SettingsFrom) -> None:
    """Register `serve`, `up` and `status` on the `embedq` subparsers."""
    serve = sub.add_parser("serve", help="HTTP gateway: OpenAI-compatible POST /v1/embeddings for web apps")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=port, default=8000, help="port to listen on")
    serve.add_argument("--broker", default=None, help="redis://… of the workers (default: EMBEDQ_BROKER_URL or local)")
    serve.add_argument("--model", default=None, help="the model the workers serve (default: the packaged MiniLM)")
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY'; visible in `ps`: prefer --api-key-file or EMBEDQ_API_KEY",
    )
    serve.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
    serve.add_argument("--max-inputs", type=positive_int, default=2048, help="texts per request; more gets 413")
    serve.add_argument("--max-body-mb", type=positive_float, default=8.0, help="request body size; more gets 413")
    serve.add_argument(
        "--max-request-chars",
        type=positive_int,
        default=500_000,
        help="characters of all texts per request; more gets 413",
    )
    serve.add_argument("--max-queue", type=positive_int, default=1000, help="interactive queue length beyond which 429")
    serve.add_argument(
        "--timeout", type=positive_float, default=60.0, help="seconds a request waits for workers (then 504)"
    )
    serve.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cache embeddings of repeated texts in Redis",
    )
    serve.add_argument("--cache-ttl", type=positive_int, default=24 * 3600, help="seconds a cached embedding lives")
    limits = serve.add_argument_group("load and slow clients (see producer/serve/limits.py)")
    limits.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=256,
        help="requests waiting on workers at once (Redis pool = this + 16)",
    )
    limits.add_argument(
        "--max-waiting", type=positive_int, default=1024, help="requests queued for a slot; more get 429"
    )
    limits.add_argument(
        "--max-connections", type=positive_int, default=2048, help="open connections; more get 429, closed"
    )
    limits.add_argument("--header-timeout", type=positive_float, default=10.0, help="seconds to send complete headers")
    limits.add_argument("--body-timeout", type=positive_float, default=30.0, help="seconds to send the body (then 408)")
    limits.add_argument(
        "--keep-alive-timeout", type=positive_int, default=5, help="seconds an idle connection stays open"
    )
    limits.add_argument("--max-header-kb", type=positive_int, default=16, help="request line + headers; more gets 400")
    serve.set_defaults(func=lambda args: cmd_serve(args, settings_from(args)))

    up = sub.add_parser("up", help="run Valkey, workers, Flower and the gateway on this machine until Ctrl-C")
    up.add_argument("--broker", default=None, help="use this Redis instead of an embedded Valkey")
    up.add_argument(
        "--broker-port", type=port, default=None, help="port of the embedded Valkey (default: a free one, printed)"
    )
    up.add_argument("--workers", type=positive_int, default=None, help="pool children (default: one per core)")
    up.add_argument(
        "--interactive-workers",
        type=non_negative_int,
        default=1,
        help="extra pool children that serve only interactive requests (0: none)",
    )
    up.add_argument("--host", default="127.0.0.1", help="address Flower and the gateway listen on")
    up.add_argument("--port", type=port, default=8000, help="gateway port")
    up.add_argument("--flower-port", type=port, default=5555, help="port of Flower, the task monitor")
    up.add_argument(
        "--model",
        default=None,
        help="local model folder or hub name the workers serve (default: the packaged all-MiniLM-L6-v2)",
    )
    up.set_defaults(func=lambda args: cmd_up(args, settings_from(args)))

    status = sub.add_parser("status", help="progress of running and finished corpus jobs")
    status.add_argument("job", nargs="?", default=None, help="one job id (default: the 20 most recent)")
    status.add_argument(
        "--broker",
        default=None,
        help="redis://… the jobs ran against (default: EMBEDQ_BROKER_URL, else the running `embedq up`)",
    )
    status.set_defaults(func=lambda args: cmd_status(args, settings_from(args)))


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    extras.require("embedq serve", "serve")
    from producer.serve.gateway import GatewayOptions, serve
    from producer.serve.limits import HttpLimits
    from workers.protocol.keys import connect, redact

    api_key = read_secret_file(args.api_key_file, "--api-key-file") if args.api_key_file else args.api_key
    if api_key:
        settings = settings.replace(api_key=api_key)
    for name in (
        "max_inputs",
        "max_body_mb",
        "max_request_chars",
        "max_queue",
        "timeout",
        "max_concurrency",
        "max_connections",
        "header_timeout",
        "body_timeout",
        "keep_alive_timeout",
        "max_header_kb",
    ):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    if args.max_waiting < 0:
        raise ConfigError(f"--max-waiting {args.max_waiting}: must be 0 or more")
    connect(settings.broker_url).close()  # fail fast with exit code 4 when the broker is not there
    options = GatewayOptions(
        max_inputs=args.max_inputs,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_request_chars=args.max_request_chars,
        max_queue=args.max_queue,
        max_concurrency=args.max_concurrency,
        max_waiting=args.max_waiting,
        timeout_s=args.timeout,
        cache=args.cache,
        cache_ttl_s=args.cache_ttl,
        http=HttpLimits(
            max_connections=args.max_connections,
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            keep_alive_timeout_s=args.keep_alive_timeout,
            max_header_bytes=args.max_header_kb * 1024,
        ),
    )
    print(
        f"embedq: gateway on http://{args.host}:{args.port} for workers at {redact(settings.broker_url)}"
        f"{' (API key required)' if settings.api_key else ''}",
        file=sys.stderr,
        flush=True,
    )
    serve(settings, args.host, args.port, options)
    return exitcodes.OK


def read_secret_file(path: str, flag: str) -> str:
    """The first line of a secret file (a key, a password), without its newline; ConfigError if unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            secret = handle.readline().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{flag} {path!r}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    if not secret:
        raise ConfigError(f"{flag} {path!r}: the file is empty; put the secret on its first line")
    return secret


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    extras.require("embedq up", "local", "serve")
    from producer.job.preflight import check_ports
    from producer.local.up import Stack, run_up

    workers = args.workers or max(1, len(os.sched_getaffinity(0)))
    embedded = args.broker is None
    if not embedded:
        from workers.protocol.keys import connect

        if args.broker_port is not None:
            raise ConfigError("--broker-port is for the embedded Valkey: leave it out with --broker")
        connect(settings.broker_url).close()
    ports = {"--port": args.port, "--flower-port": args.flower_port}
    if args.broker_port is not None:
        ports["--broker-port"] = args.broker_port
    if args.model is not None:
        from workers.protocol.model_info import resolve_model

        resolve_model(settings.model)  # a mistyped model stops here, not in four services' logs
    check_ports(args.host, ports)
    return run_up(
        Stack(
            settings,
            embedded=embedded,
            workers=workers,
            host=args.host,
            port=args.port,
            flower_port=args.flower_port,
            reserved=args.interactive_workers,
            broker_port=args.broker_port,
        )
    )


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from producer.job.status import read_jobs, render
    from workers.protocol.keys import Keys, connect, redact

    source = "--broker" if args.broker else "EMBEDQ_BROKER_URL" if "EMBEDQ_BROKER_URL" in os.environ else ""
    if not source:
        from producer.local.state import pick

        found = pick()
        if found is not None:
            settings = settings.replace(broker_url=found.broker_url)
            source = f"the embedded Valkey of `embedq {found.kind}` (pid {found.pid})"
        else:
            source = "the default; no `embedq up` is running here: pass --broker or set EMBEDQ_BROKER_URL"
    try:
        client = connect(settings.broker_url)
    except BrokerUnavailable as error:
        raise BrokerUnavailable(f"{error} [broker: {source}]") from None
    print(f"broker: {redact(settings.broker_url)} ({source})", flush=True)
    statuses = read_jobs(client, Keys(settings.key_prefix), args.job)
    if args.job and not statuses:
        print(
            f"embedq: no job {args.job!r} at {redact(settings.broker_url)} "
            f"(prefix {settings.key_prefix!r}); run `embedq status` to list jobs",
            file=sys.stderr,
        )
        return exitcodes.USAGE
    if not statuses:
        print(f"no jobs recorded on {redact(settings.broker_url)} yet")
        return exitcodes.OK
    print(render(statuses))
    if args.job:
        from producer.job.status import render_running, running_chunks

        print()
        print(render_running(running_chunks(client, Keys(settings.key_prefix), args.job)))
    return exitcodes.OK
