"""One error hierarchy for embedq; whether an error is worth retrying follows from its type."""

from __future__ import annotations


class EmbedqError(Exception):
    """Root of every error embedq raises on purpose."""

    #: A retryable error may succeed when the same work runs again (elsewhere or later).
    retryable: bool = False


class ConfigError(EmbedqError):
    """Raised when settings, flags or EMBEDQ_* variables are invalid or contradict each other."""


class MissingExtra(ConfigError):
    """Raised when a command needs an optional part of embedq (an extra) that is not installed."""


class ModelError(EmbedqError):
    """Raised when a model cannot be found, read or loaded."""


class ModelNotInstalled(ModelError):
    """Raised when describing a model needs a package of the worker extra (the packaged default, the hub)."""


class ModelMismatch(EmbedqError):
    """Raised when a task asks for a model other than the one this worker serves."""


class ModelNotServed(ConfigError):
    """Raised when a request or job names a model that no live worker of the fleet serves (HTTP 404, exit 2)."""

    def __init__(self, message: str, *, model: str = "", served: list[str] | None = None) -> None:
        self.model = model
        self.served = list(served or [])
        super().__init__(message)


class InputError(EmbedqError):
    """Raised when an input record is invalid (not JSON, no text, not a string, bad encoding)."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None) -> None:
        self.source = source
        self.line = line
        self.reason = message
        where = f"{source}:{line}: " if source and line is not None else (f"{source}: " if source else "")
        super().__init__(f"{where}{message}")


class BrokerUnavailable(EmbedqError):
    """Raised when the broker (Redis) cannot be reached."""

    retryable = True


class WorkerNotReady(EmbedqError):
    """Raised when a task runs in a process whose model and store were never initialised."""

    retryable = True


class ResultMissing(EmbedqError):
    """Raised when a chunk reported done but its stored array is gone (expired or lost)."""

    retryable = True


class InsufficientMemory(EmbedqError):
    """Raised before loading a model that would not fit in the memory available to the workers."""


class ResultsRefused(EmbedqError):
    """Raised when a task asks a worker to write results outside the folder it was started with."""


class JobFailed(EmbedqError):
    """Raised when a job ends with chunks that failed or were quarantined."""


class WorkersFailed(EmbedqError):
    """Raised when the local workers of an embedded job exit on their own (bad model, not enough memory)."""


class NoWorkers(EmbedqError):
    """Raised when no worker consumes the queue within the start-up timeout."""

    retryable = True


class InvalidRecords(InputError):
    """Raised when records given to the client or gateway are not texts; names each bad index and why."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        shown = "; ".join(f"input[{index}]: {reason}" for index, reason in problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        super().__init__(f"{len(problems)} invalid input record(s): {shown}{more}")


class RequestTimeout(EmbedqError):
    """Raised when an interactive request gets no result in time (workers busy, stopped or absent)."""

    retryable = True


class QueueFull(EmbedqError):
    """Raised when the interactive queue is longer than the gateway accepts (HTTP 429)."""

    retryable = True


def is_retryable(error: BaseException) -> bool:
    """The single place that decides whether a failure is worth running again."""
    if isinstance(error, EmbedqError):
        return error.retryable
    # Connection trouble of any client library is transient; anything else is a bug or bad input.
    # redis-py and kombu errors do not derive from OSError, so they are named here.
    import kombu.exceptions
    import redis.exceptions

    transient = (
        ConnectionError,
        TimeoutError,
        OSError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        kombu.exceptions.OperationalError,
    )
    return isinstance(error, transient)
