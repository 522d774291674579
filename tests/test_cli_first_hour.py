"""A new user's first hour: every mistake is one line on stderr with a documented exit code, and no silent wait.

Each test runs the installed `embedq` script (the one `make install` puts in .venv/bin) in a subprocess.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.cli import exitcodes
from producer.cli.main import build_parser
from producer.local.embedded_redis import EmbeddedRedis, free_port
from workers.protocol.keys import redact

EMBEDQ = str(Path(sys.executable).parent / "embedq")


def user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no EMBEDQ_* settings, offline hub, a private runtime folder of this test's own."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    return {**env, "HF_HUB_OFFLINE": "1", "XDG_RUNTIME_DIR": str(runtime), **extra}


def embedq(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EMBEDQ, *args], env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line(done: subprocess.CompletedProcess[str], code: int, expected: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    assert expected in lines[0], lines[0]


DEAD = "redis://127.0.0.1:1/0"  # nothing listens on port 1

#: (arguments, exit code, text the one stderr line must contain); DOCS is a one-line text file, TMP a folder.
BAD_ARGUMENTS: list[tuple[list[str], int, str]] = [
    ([], exitcodes.USAGE, "required: command"),
    (["embd"], exitcodes.USAGE, "embd: choose one of embed, worker, serve, up, status"),
    (["embed", "DOCS", "-o", "/sys/x.npy"], exitcodes.USAGE, "-o /sys/x.npy: cannot write in /sys"),
    (["embed", "DOCS", "-o", "DOCS/x.npy"], exitcodes.USAGE, "is a file, not a folder"),
    (["embed", "DOCS", "-o", "TMP"], exitcodes.USAGE, "name the output .npy or .parquet"),
    (["embed", "DOCS", "-o", "TMP/x.txt"], exitcodes.USAGE, "name the output .npy or .parquet"),
    (["embed", "DOCS"], exitcodes.USAGE, "required: -o/--output"),
    (
        ["embed", "DOCS", "-o", "TMP/x.npy", "--batch-tokens", "0"],
        exitcodes.USAGE,
        "--batch-tokens 0: must be at least 16",
    ),
    (["embed", "DOCS", "-o", "TMP/x.npy", "--workers", "0"], exitcodes.USAGE, "--workers 0: must be at least 1"),
    (["embed", "DOCS", "-o", "TMP/x.npy", "--workers", "-1"], exitcodes.USAGE, "--workers -1: must be at least 1"),
    (["embed", "DOCS", "-o", "TMP/x.npy", "--workers", "two"], exitcodes.USAGE, "--workers 'two': must be a whole"),
    (["embed", "DOCS", "-o", "TMP/x.npy", "--max-in-flight", "0"], exitcodes.USAGE, "--max-in-flight 0: must be at"),
    (["embed", "DOCS", "-o", "TMP/x.npy", "--chunk-size", "-3"], exitcodes.USAGE, "--chunk-size -3: must be at least"),
    (["embed", "DOCS", "-o", "TMP/x.npy", "--max-length", "0"], exitcodes.USAGE, "--max-length 0: must be at least"),
    (["embed", "DOCS", "-o", "TMP/x.npy", "--stall-timeout", "0"], exitcodes.USAGE, "--stall-timeout 0: must be more"),
    (["embed", "DOCS", "-o", "TMP/x.npy", "--wait-for-workers", "-1"], exitcodes.USAGE, "--wait-for-workers -1"),
    (
        ["embed", "DOCS", "-o", "TMP/x.npy", "--pooling", "sum"],
        exitcodes.USAGE,
        "--pooling sum: choose one of auto, cls",
    ),
    (["embed", "DOCS", "-o", "TMP/x.npy", "--results", "s3:x"], exitcodes.USAGE, "--results 's3:x': use redis or"),
    (
        ["embed", "DOCS", "-o", "TMP/x.npy", "--results", "disk:TMP/missing/x"],
        exitcodes.USAGE,
        "missing does not exist",
    ),
    (
        ["embed", "DOCS", "-o", "TMP/x.npy", "--broker", "localhost:6379"],
        exitcodes.USAGE,
        "--broker localhost:6379: use",
    ),
    (["embed", "DOCS", "-o", "TMP/x.npy", "--broker", DEAD], exitcodes.BROKER, f"cannot reach Redis at {DEAD}"),
    (["embed", "TMP/none.txt", "-o", "TMP/x.npy"], exitcodes.INPUT, "none.txt"),
    (["embed", "DOCS", "-o", "TMP/x.npy", "--model", "TMP/no-model"], exitcodes.MODEL, "no such folder"),
    (["status", "--broker", DEAD], exitcodes.BROKER, "[broker: --broker]"),
    (["status"], exitcodes.BROKER, "[broker: EMBEDQ_BROKER_URL]"),  # EMBEDQ_BROKER_URL is dead below
    (["status", "--broker", "redis://:secret@127.0.0.1:1/0"], exitcodes.BROKER, "redis://:***@127.0.0.1:1/0"),
    (["up", "--workers", "0"], exitcodes.USAGE, "--workers 0: must be at least 1"),
    (["up", "--interactive-workers", "-1"], exitcodes.USAGE, "--interactive-workers -1: must be at least 0"),
    (["up", "--flower-port", "99999"], exitcodes.USAGE, "--flower-port 99999: a port is at most 65535"),
    (["up", "--broker", DEAD, "--broker-port", "7000"], exitcodes.USAGE, "--broker-port is for the embedded"),
    (["up", "--model", "TMP/no-model"], exitcodes.MODEL, "no such folder"),
    (["serve", "--port", "0"], exitcodes.USAGE, "--port 0: must be at least 1"),
    (["serve", "--max-inputs", "0"], exitcodes.USAGE, "--max-inputs 0: must be at least 1"),
    (["serve", "--timeout", "-5"], exitcodes.USAGE, "--timeout -5: must be more than 0"),
    (["serve", "--broker", DEAD], exitcodes.BROKER, f"cannot reach Redis at {DEAD}"),
    (["worker", "--concurrency", "0"], exitcodes.USAGE, "--concurrency 0: must be at least 1"),
    (["worker", "--queues", "fast"], exitcodes.USAGE, "--queues fast: choose from interactive, bulk"),
    (["worker", "--batch-tokens", "8"], exitcodes.USAGE, "--batch-tokens 8: must be at least 16"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("first-hour")
    docs = folder / "docs.txt"
    docs.write_text("one document\n", encoding="utf-8")
    return {"DOCS": str(docs), "TMP": str(folder)}


def _fill(arg: str, places: dict[str, str]) -> str:
    for name, value in places.items():
        arg = arg.replace(name, value)
    return arg


@pytest.mark.parametrize(("args", "code", "expected"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_and_a_documented_exit_code(
    args: list[str], code: int, expected: str, places: dict[str, str], tmp_path: Path
) -> None:
    # given a user's environment (for the bare `status`: a broker URL nothing answers)
    env = user_env(tmp_path, **({"EMBEDQ_BROKER_URL": DEAD} if args == ["status"] else {}))
    # when the real command runs with the bad arguments
    done = embedq(*[_fill(a, places) for a in args], env=env)
    # then exactly one line says what to change, with the documented code, and nothing was half-written
    assert_one_line(done, code, _fill(expected, places))
    assert "secret" not in done.stderr
    assert code in exitcodes.MEANINGS
    assert not list(Path(places["TMP"]).glob("x.*")) and not (Path(places["TMP"]) / "missing").exists()


def test_an_output_that_does_not_fit_is_refused_before_anything_starts(tmp_path: Path) -> None:
    # given a 64 KiB file system and a corpus of 2,000 lines (2,000 x 384 floats = 3 MB)
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root and must be able to mount a tmpfs: {mounted.stderr!r}")
        pytest.skip(f"cannot mount a tmpfs here (not root?): {mounted.stderr!r}")
    try:
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("".join(f"document {i}\n" for i in range(2000)), encoding="utf-8")
        # when the output is to go there
        done = embedq("embed", str(corpus), "-o", str(small / "x.npy"), env=user_env(tmp_path))
        # then one line says how much is free and needed, and no file was left there
        assert_one_line(done, exitcodes.USAGE, "MB free in")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.fixture
def lone_valkey(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A broker no worker consumes from."""
    server = EmbeddedRedis(tmp_path / "valkey").start()
    yield server
    server.stop()


def test_a_broker_without_workers_is_named_within_seconds(lone_valkey: EmbeddedRedis, tmp_path: Path) -> None:
    # given a broker with no worker and a corpus
    corpus = tmp_path / "docs.txt"
    corpus.write_text("a\nb\n", encoding="utf-8")
    # when a job is sent there
    done = embedq(
        "embed", str(corpus), "-o", str(tmp_path / "x.npy"), "--broker", lone_valkey.url, env=user_env(tmp_path)
    )
    # then it says which queue has no consumer, and writes nothing
    assert_one_line(done, exitcodes.NO_WORKERS, f"no worker consumes queue 'bulk' on {redact(lone_valkey.url)}")
    assert "--wait-for-workers" in done.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("x.")] == []


def test_a_backgrounded_job_stops_on_sigint_even_when_the_shell_ignored_it(
    lone_valkey: EmbeddedRedis, tmp_path: Path
) -> None:
    # given a job started as a shell starts a background job: SIGINT ignored, waiting for workers
    corpus = tmp_path / "docs.txt"
    corpus.write_text("a\n", encoding="utf-8")
    process = subprocess.Popen(
        [EMBEDQ, "embed", str(corpus), "-o", str(tmp_path / "x.npy"), "--broker", lone_valkey.url]
        + ["--wait-for-workers", "120"],
        env=user_env(tmp_path),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509 - no threads here
    )
    try:
        assert process.stderr is not None
        waiting = process.stderr.readline()
        assert "waiting up to 120 s for a worker to consume 'bulk'" in waiting, waiting
        # when it gets SIGINT (kill -INT %1, or Ctrl-C after fg)
        process.send_signal(signal.SIGINT)
        # then it stops at once with the interrupted code and one line
        assert process.wait(timeout=30) == exitcodes.INTERRUPTED
        rest = process.stderr.read()
        assert "interrupted" in rest and "Traceback" not in rest, rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_up_refuses_a_busy_port_before_starting_anything(tmp_path: Path) -> None:
    # given another program listening on the port asked for
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # when `embedq up` is asked to use it for the gateway, or for its broker
        for flag in ("--port", "--broker-port"):
            done = embedq("up", flag, str(port), "--flower-port", str(free_port()), env=user_env(tmp_path))
            # then one line names the flag, the port, and what to do
            assert_one_line(done, exitcodes.USAGE, f"{flag} {port}: 127.0.0.1:{port} is already in use")
            assert done.stdout == ""


def test_a_failing_up_points_to_a_log_that_exists(tiny_bert: Path, tmp_path: Path) -> None:
    # given a model folder whose weights are damaged (its config reads fine, so only loading fails)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for item in tiny_bert.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    # when `embedq up` starts with it
    args = ["up", "--workers", "1", "--interactive-workers", "0", "--model", str(broken)]
    done = embedq(
        *args, "--port", str(free_port()), "--flower-port", str(free_port()), env=user_env(tmp_path), timeout=180
    )
    # then it stops with one line naming the service and a log file that is still there to read
    lines = done.stderr.strip().splitlines()
    assert done.returncode == exitcodes.WORKERS and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    log = Path(lines[0].rsplit("(log ", 1)[1].rstrip(")"))
    try:
        assert log.is_file() and log.stat().st_size > 0, lines[0]
        assert "ready" not in done.stdout
    finally:
        subprocess.run(["rm", "-rf", str(log.parent)], check=True)


def test_every_flag_has_a_sentence_and_help_lists_exit_codes(tmp_path: Path) -> None:
    # given the parser of the real command
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[union-attr]
    assert set(subcommands) >= {"embed", "status", "up", "serve", "worker"}
    for name, sub in subcommands.items():
        # then every flag says what it does
        for action in sub._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 10, f"embedq {name} {action.option_strings}: no help"
        # and the real --help shows defaults and every exit code
        shown = embedq(name, "--help", env=user_env(tmp_path)).stdout
        assert "(default:" in shown and "exit codes:" in shown, shown
        for code, meaning in exitcodes.MEANINGS.items():
            assert f"{code:<4} {meaning}" in shown
    shown = embedq("embed", "--help", env=user_env(tmp_path)).stdout
    assert "documents per task (default: about 3 chunks per local worker child" in " ".join(shown.split())
    assert "--text-field TEXT_FIELD" in shown and "--pooling {auto,cls,mean,max}" in shown


def test_status_without_a_broker_says_which_it_asked(tmp_path: Path, lone_valkey: EmbeddedRedis) -> None:
    # given a broker named by EMBEDQ_BROKER_URL and no `embedq up` running
    env = user_env(tmp_path, EMBEDQ_BROKER_URL=lone_valkey.url, EMBEDQ_KEY_PREFIX=f"t{uuid.uuid4().hex[:8]}")
    done = embedq("status", env=env)
    # then it names the broker it asked and why, and that it has no jobs
    assert done.returncode == 0, done.stderr
    assert f"broker: {redact(lone_valkey.url)} (EMBEDQ_BROKER_URL)" in done.stdout
    assert f"no jobs recorded on {redact(lone_valkey.url)} yet" in done.stdout
