"""Named exit codes of the embedq command line."""

OK = 0
#: The job ran but some chunks failed or were quarantined (the output is not written).
JOB_FAILED = 1
#: Bad flags or settings.
USAGE = 2
#: Bad input: missing file, invalid record with --on-invalid fail.
INPUT = 3
#: The broker (Redis) cannot be reached.
BROKER = 4
#: The model cannot be found or loaded, or does not fit in memory.
MODEL = 5
#: Local workers did not start.
WORKERS = 6
#: Ctrl-C or SIGTERM.
INTERRUPTED = 130
