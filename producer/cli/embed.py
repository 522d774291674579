"""`embedq embed`: its flags, and the command that checks everything it can, then runs the job."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.cli import exitcodes
from producer.cli.args import non_negative_float, non_negative_int, positive_float, positive_int
from producer.cli.common import add_model_flags, default_workers, say, settings_from
from producer.cli.vector_flags import add_vector_flags, vector_options
from producer.job.chunk_plan import DEFAULT_CHUNK_ROWS, MIN_TAIL_ROWS, auto_chunk_rows
from producer.job.quantize import PRECISIONS
from workers.protocol import extras
from workers.protocol.errors import ConfigError
from workers.protocol.long_docs import CHUNKS, LONG_POLICIES, TRUNCATE

if TYPE_CHECKING:
    from producer.job.spec import JobOptions, JobReport
    from producer.local.cluster import LocalCluster
    from workers.protocol.config import Settings
    from workers.protocol.model_info import ModelInfo


def add_embed_command(sub: Any) -> None:
    """The `embed` subparser on `sub` (argparse's subparsers action)."""
    embed = sub.add_parser("embed", help="embed a corpus file into .npy or .parquet")
    embed.add_argument("input", help=".txt (one document per line), .jsonl, .csv, .parquet, or - for stdin")
    embed.add_argument(
        "-o", "--output", required=True, help="OUTPUT.npy or OUTPUT.parquet (checked before any task is sent)"
    )
    add_model_flags(embed)
    embed.add_argument(
        "--broker",
        default=None,
        help="redis://… of running workers (default: embedded Valkey and local workers, or EMBEDQ_BROKER_URL when set)",
    )
    embed.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="local pool children, embedded mode only (default: one per core)",
    )
    embed.add_argument(
        "--wait-for-workers",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="with --broker: how long to wait for a worker on the queue before exit 7 (0: a few seconds' grace)",
    )
    embed.add_argument(
        "--no-worker-check",
        dest="worker_check",
        action="store_false",
        help="with --broker: queue the job even if no worker consumes it yet (an autoscaler starts them)",
    )
    # auto (measured, producer/job/chunk_plan.py): about 3 chunks per local pool child, 512-2048 rows.
    embed.add_argument(
        "--chunk-size",
        type=positive_int,
        default=None,
        help="documents per task (default: about 3 chunks per local worker child, 512-2048; 512 on --broker, stdin)",
    )
    # 0 (measured, bench/command_vs_encoder.py: full 512-row chunks ran 1.27-1.28x the in-process encoder,
    # shrinking ones split 4 ways 0.95-1.23x in the same runs on a busy 2-core machine).
    embed.add_argument(
        "--tail-chunks",
        type=non_negative_int,
        default=0,
        help="near the end, cut what is left into this many shrinking chunks (guided self-scheduling; try 2 x "
        "workers); 0 keeps every chunk full (default)",
    )
    embed.add_argument(
        "--min-chunk-size",
        type=positive_int,
        default=MIN_TAIL_ROWS,
        help="smallest of the shrinking tail chunks (default: %(default)s)",
    )
    embed.add_argument(
        "--max-in-flight",
        type=positive_int,
        default=None,
        help="chunks sent but not yet collected (default: 2 x workers + 2, at least 4)",
    )
    embed.add_argument(
        "--pooling",
        choices=("auto", "cls", "mean", "max"),
        default="auto",
        help="auto: the model folder's sentence-transformers pooling config, else mean; or cls, mean, max",
    )
    embed.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="tokens per text before truncation (default: the model's max_seq_length)",
    )
    embed.add_argument(
        "--long",
        choices=LONG_POLICIES,
        default=TRUNCATE,
        help="a document over the max length: truncate it (counted); chunk-mean: embed overlapping windows and "
        "average them into its row; chunks: one row per window (Parquet: id, window, token_start, token_end)",
    )
    embed.add_argument("--no-normalize", dest="normalize", action="store_false", help="skip L2 normalisation")
    add_vector_flags(embed)
    embed.add_argument("--text-field", default="text", help="JSONL key or CSV column holding the text")
    embed.add_argument(
        "--id-field", default="id", help="JSONL key or CSV column holding the record id (missing: the line number)"
    )
    embed.add_argument(
        "--format",
        dest="input_format",
        choices=("auto", "txt", "jsonl", "csv", "parquet"),
        default="auto",
        help="input format; auto goes by the file suffix (stdin: JSONL if it starts with '{', else text)",
    )
    embed.add_argument(
        "--on-invalid",
        choices=("fail", "skip"),
        default="fail",
        help="fail: stop at the first invalid record; skip: set it aside in OUTPUT.rejects.jsonl",
    )
    embed.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="output values: int8/uint8 scaled by per-dimension ranges of the whole job (in the manifest), "
        "binary/ubinary one bit per dimension (as sentence-transformers' quantize_embeddings)",
    )
    embed.add_argument("--results", default="redis", help="where workers leave chunk results: redis or disk:PATH")
    embed.add_argument(
        "--pool", choices=("prefork", "solo", "threads"), default="prefork", help="local worker pool (embedded mode)"
    )
    embed.add_argument(
        "--start-method", choices=("fork", "spawn"), default=None, help="prefork start method (default: fork)"
    )
    embed.add_argument(
        "--stall-timeout",
        type=positive_float,
        default=600.0,
        help="seconds without news before silent chunks are sent again",
    )
    embed.add_argument(
        "--workers-lost-timeout",
        type=positive_float,
        default=60.0,
        help="seconds with no live worker on the broker (none started, or every host lost) before the job fails, "
        "naming the rows not embedded (default: %(default)s)",
    )
    embed.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a terminal)"
    )
    embed.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    """Check what is cheap, start the embedded cluster (if any), check the rest while it boots, run the job."""
    from producer.job.fleet_model import job_model
    from producer.job.preflight import check_results
    from producer.job.readers import open_input
    from producer.job.spec import with_earlier_chunk_rows
    from workers.protocol.store import parse_store_spec

    settings = settings_from(args)
    if args.start_method:
        settings = settings.replace(pool_start_method=args.start_method)
    embedded = args.broker is None and "EMBEDQ_BROKER_URL" not in os.environ
    _check_flags(args, embedded)
    parse_store_spec(args.results)
    check_results(args.results)
    if args.input != "-":
        open_input(args.input).close()
    # Read from the model's folder; a light install asks the fleet for what it cannot read. On a fleet, a model
    # no live worker serves is refused here, naming those served (producer/job/fleet_model.py).
    model = job_model(
        settings,
        on_fleet=not embedded,
        check_served=args.worker_check,
        wait_s=args.wait_for_workers,
        pooling=args.pooling,
        max_length=args.max_length,
    )
    vectors = vector_options(args, model)
    if args.long != TRUNCATE and vectors["prompt"]:
        raise ConfigError(
            f"--long {args.long} with a prompt ({vectors['prompt_name'] or 'given'}): windows take no prompt yet; "
            "use --long truncate, or --prompt '' to embed without one"
        )
    workers = args.workers or default_workers()
    with contextlib.ExitStack() as stack:
        # A worker boots for seconds (imports, then the model in each pool child): start it now, so that it
        # boots while the checks that read the input run and the first chunks are read and sent. Any error
        # from here on leaves the stack, which stops the workers and Valkey and removes their folder.
        cluster = stack.enter_context(_local_cluster(args, settings, model, workers)) if embedded else None
        rows_hint = _check_input_and_output(args, model, vectors)
        auto_size = args.chunk_size is None
        args.chunk_size = args.chunk_size or (auto_chunk_rows(rows_hint, workers) if embedded else DEFAULT_CHUNK_ROWS)
        options = _job_options(args, settings, model, vectors, workers)
        if auto_size:  # a rerun resumes with the chunks it cut before, whatever --workers says now
            options = with_earlier_chunk_rows(args.input, args.output, options)
        if cluster is None:
            report = _run_on_fleet(args, settings, options)
        else:
            report = _run_embedded(args, settings, options, cluster, workers)
    summary(report, args.output)
    return exitcodes.OK


def _check_flags(args: argparse.Namespace, embedded: bool) -> None:
    """Flag combinations that cannot work, and the extras they need; ConfigError naming the flags."""
    from producer.job.output import output_kind
    from producer.job.readers import detect_format

    try:
        kind = output_kind(args.output)
    except ValueError:
        raise ConfigError(f"-o {args.output}: name the output .npy or .parquet") from None
    if args.long == CHUNKS and kind != "parquet":
        raise ConfigError(
            f"--long chunks -o {args.output}: one row per window needs the window columns of Parquet; "
            "name the output .parquet, or use --long chunk-mean for one row per document"
        )
    if args.long == CHUNKS and args.precision != "float32":
        raise ConfigError(
            f"--long chunks --precision {args.precision}: window rows are written as float32; "
            "drop --precision, or use --long chunk-mean"
        )
    if embedded:
        extras.require("embedq embed without --broker (the embedded default)", "local")
    if kind == "parquet":
        extras.require("embedq embed -o OUTPUT.parquet", "parquet")
    if detect_format(args.input, args.input_format) == "parquet":
        extras.require("embedq embed INPUT.parquet", "parquet")


def _local_cluster(args: argparse.Namespace, settings: Settings, model: ModelInfo, workers: int) -> LocalCluster:
    """The embedded Valkey and local workers for this job (not started yet)."""
    from producer.local.cluster import LocalCluster
    from workers.protocol.store import parse_store_spec

    results_kind, disk_path = parse_store_spec(args.results)
    return LocalCluster(
        # Local workers write disk results only under the folder this command names.
        settings.replace(
            model=model.path if model.is_local else settings.model,
            disk_results_root=str(Path(disk_path).resolve()) if results_kind == "disk" else "",
        ),
        concurrency=workers,
        pool=args.pool,
    )


def _check_input_and_output(args: argparse.Namespace, model: ModelInfo, vectors: dict[str, Any]) -> int | None:
    """The checks that read the input: room for the output, and (--on-invalid fail) the first records.

    Returns the input's line count (None for stdin), which sizes the output and the chunks.
    """
    from producer.job.preflight import check_first_records, check_output
    from producer.job.readers import count_lines

    rows_hint = count_lines(args.input, args.input_format)
    check_output(
        args.output,
        rows_hint=rows_hint or 0,
        dim=vectors["dimensions"] or model.dim,
        precision=args.precision,
    )
    if args.on_invalid == "fail":
        check_first_records(
            args.input,
            fmt=args.input_format,
            text_field=args.text_field,
            id_field=args.id_field,
            limit=args.chunk_size or DEFAULT_CHUNK_ROWS,
        )
    return rows_hint


def _job_options(
    args: argparse.Namespace, settings: Settings, model: ModelInfo, vectors: dict[str, Any], workers: int
) -> JobOptions:
    from producer.job.spec import JobOptions

    return JobOptions(
        model=model,
        normalize=args.normalize,
        dtype=settings.dtype,
        batch_tokens=args.batch_tokens,
        results=args.results,
        chunk_rows=args.chunk_size,
        max_in_flight=args.max_in_flight or max(4, 2 * workers + 2),
        tail_split=args.tail_chunks,
        min_chunk_rows=args.min_chunk_size,
        text_field=args.text_field,
        id_field=args.id_field,
        input_format=args.input_format,
        on_invalid=args.on_invalid,
        precision=args.precision,
        stall_timeout_s=args.stall_timeout,
        workers_lost_s=args.workers_lost_timeout,
        long=args.long,
        **vectors,
    )


def _run_on_fleet(args: argparse.Namespace, settings: Settings, options: JobOptions) -> JobReport:
    """The job on running workers (--broker): the broker must answer, and (unless told not to) a worker consume."""
    from producer.job.preflight import wait_for_consumers
    from producer.job.runner import Job
    from workers.protocol.keys import connect, redact

    connect(settings.broker_url).close()  # exit 4 at once when the broker is not there
    if args.worker_check:
        consumers = wait_for_consumers(settings, options.queue, wait_s=args.wait_for_workers, say=say)
        say(f"{len(consumers)} worker(s) consume {options.queue!r} on {redact(settings.broker_url)}")
    return Job(args.input, args.output, options, settings, progress=args.progress).run()


def _run_embedded(
    args: argparse.Namespace, settings: Settings, options: JobOptions, cluster: LocalCluster, workers: int
) -> JobReport:
    """The job on the embedded cluster (started, its workers maybe still booting); stops the cluster once done."""
    from producer.job.runner import Job
    from producer.local import state as local_state

    say(f"starting an embedded Valkey and {workers} local worker{'s' if workers > 1 else ''} ({args.pool})")
    announced = local_state.announce("embed", cluster.broker_url, time.time())
    job = Job(
        args.input,
        args.output,
        options,
        settings.replace(broker_url=cluster.broker_url),
        progress=args.progress,
        on_idle=cluster.check_alive,
    )
    try:
        report = job.run()
    finally:
        local_state.withdraw(announced)
    # Finished and written: the workers have nothing left to do and Valkey nothing worth keeping, so both are
    # killed at once (a warm stop costs 0.6-0.9 s). Unless a second copy of a chunk may still be writing into
    # a --results disk folder: a warm stop lets it finish and delete what it wrote.
    second_copies = args.results.startswith("disk:") and report.resent_chunks > 0
    cluster.stop(at_once=not second_copies)
    return report


def summary(report: Any, output: str) -> None:
    """The one line a finished job prints on stdout."""
    reused = f", {report.reused_chunks} chunks reused from an earlier run" if report.reused_chunks else ""
    split = f", {report.split} split into {report.windows} windows" if report.split else ""
    print(
        f"embedq: {report.rows} docs in {report.wall_s:.1f} s ({report.docs_per_s:.1f} docs/s), "
        f"{report.truncated} truncated{split}, {report.rejected} rejected{reused} -> {output} "
        f"(manifest {output}.manifest.json)",
        flush=True,
    )
