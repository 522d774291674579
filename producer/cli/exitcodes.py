"""Named exit codes of the embedq command line; `MEANINGS` is what every `--help` lists."""

OK = 0
#: The job ran but some chunks failed or were quarantined (the output is not written).
JOB_FAILED = 1
#: Bad flags or settings, or an output that cannot be written.
USAGE = 2
#: Bad input: missing file, invalid record with --on-invalid fail.
INPUT = 3
#: The broker (Redis) cannot be reached.
BROKER = 4
#: The model cannot be found or loaded, or does not fit in memory.
MODEL = 5
#: Local workers (or a service of `embedq up`) did not start or exited.
WORKERS = 6
#: No worker consumes the job's queue on the broker given (see --wait-for-workers).
NO_WORKERS = 7
#: Ctrl-C or SIGTERM.
INTERRUPTED = 130

MEANINGS: dict[int, str] = {
    OK: "done",
    JOB_FAILED: "some chunks failed (named on stderr), or an unexpected error",
    USAGE: "bad flags or settings, or an output that cannot be written",
    INPUT: "bad input (missing file, invalid record)",
    BROKER: "broker (Redis) unreachable",
    MODEL: "model missing, unreadable or too big for memory",
    WORKERS: "local workers or a service of `embedq up` failed",
    NO_WORKERS: "no worker consumes the queue on --broker",
    INTERRUPTED: "interrupted (Ctrl-C or SIGTERM)",
}


def epilog() -> str:
    """The exit-code table at the end of every `--help`."""
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in MEANINGS.items())
