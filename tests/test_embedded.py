"""`embedq embed` without --broker: embedded Valkey + local workers, all stopped whatever happens.

Each run gets its own TMPDIR, so that every process it started (found by scanning /proc for that
folder in a command line or an environment) and every temp folder it made can be checked for afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from producer.cli import exitcodes
from tests.conftest import ROOT, run_embedq, wait_until

SUMMARY = re.compile(r"^embedq: (\d+) docs in [\d.]+ s \(([\d.]+) docs/s\), (\d+) truncated, (\d+) rejected")


def _processes_marked_by(marker: str) -> list[str]:
    """Live processes whose command line or environment mentions `marker` (pid: command line)."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if needle in cmdline or needle in environ:
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
            found.append(f"{entry}: {shown}")
    return found


class Run:
    """One `embedq embed` run in embedded mode, with a private TMPDIR to check for leftovers."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmpdir = tmp_path / "run-tmp"
        self.tmpdir.mkdir()
        self.env = {"TMPDIR": str(self.tmpdir)}

    def full_env(self) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
        return {**inherited, "PYTHONPATH": str(ROOT), **self.env}

    def orphans(self) -> list[str]:
        return _processes_marked_by(str(self.tmpdir))

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.tmpdir.iterdir())

    def assert_nothing_left(self) -> None:
        # Pool children killed with their group may take a moment to be reaped: wait, don't sleep.
        assert wait_until(lambda: not self.orphans(), timeout_s=20), self.orphans()
        assert self.leftovers() == [], self.leftovers()


def _corpus(path: Path, rows: int) -> Path:
    sample = (ROOT / "producer" / "samples" / "sample.jsonl").read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(sample[i % len(sample)] for i in range(rows)) + "\n", encoding="utf-8")
    return path


def test_embedded_run_completes_prints_the_summary_and_leaves_nothing(tiny_bert: Path, tmp_path: Path) -> None:
    # given a corpus and no broker
    run = Run(tmp_path)
    corpus = _corpus(tmp_path / "corpus.jsonl", 200)
    out = tmp_path / "out.npy"
    # when it is embedded with the embedded default (Valkey + local workers; one child keeps the test cheap)
    result = run_embedq(
        "embed",
        str(corpus),
        "-o",
        str(out),
        "--model",
        str(tiny_bert),
        "--chunk-size",
        "32",
        "--workers",
        "1",
        env=run.env,
    )
    # then it completes with the summary line and a complete output
    assert result.returncode == 0, result.stderr
    summary = SUMMARY.match(result.stdout.strip().splitlines()[-1])
    assert summary, result.stdout
    assert int(summary.group(1)) == 200 and float(summary.group(2)) > 0
    assert np.load(out).shape == (200, 32)
    assert json.loads(Path(f"{out}.manifest.json").read_text())["rows"] == 200
    assert "embedded Valkey" in result.stderr
    # and no process and no temp folder of this run is left
    run.assert_nothing_left()


def test_without_chunk_size_the_job_gives_each_local_child_three_chunks(tiny_bert: Path, tmp_path: Path) -> None:
    # given 4,000 documents, two local pool children and no --chunk-size
    run = Run(tmp_path)
    corpus = _corpus(tmp_path / "corpus.jsonl", 4000)
    out = tmp_path / "out.npy"
    # when it is embedded
    result = run_embedq("embed", str(corpus), "-o", str(out), "--model", str(tiny_bert), "--workers", "2", env=run.env)
    # then the chunks are sized from the corpus: ceil(4000 / (3 x 2)) = 667 rows, 6 chunks, every row written
    assert result.returncode == 0, result.stderr
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert (manifest["chunk_rows"], manifest["chunks"], manifest["rows"]) == (667, 6, 4000)
    assert np.load(out).shape == (4000, 32)
    run.assert_nothing_left()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_mid_job_stops_everything_and_exits_130(tiny_bert: Path, tmp_path: Path, signum: int) -> None:
    # given an embedded job of many small chunks, well under way (chunks are being written)
    run = Run(tmp_path)
    corpus = _corpus(tmp_path / "corpus.jsonl", 4000)
    out = tmp_path / "out.npy"
    command = [
        sys.executable,
        "-m",
        "producer.cli",
        "embed",
        str(corpus),
        "-o",
        str(out),
        "--model",
        str(tiny_bert),
        "--chunk-size",
        "2",
        "--workers",
        "1",
    ]
    with open(tmp_path / "stderr", "wb") as stderr:
        producer = subprocess.Popen(command, env=run.full_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        log = Path(f"{out}.partial.log")
        chunks_written = lambda: log.exists() and len(log.read_text().splitlines()) > 3  # noqa: E731
        assert wait_until(chunks_written, timeout_s=120), (tmp_path / "stderr").read_text()
        assert run.orphans(), "the job's server and workers should be running now"
        # when the producer gets the signal
        producer.send_signal(signum)
        code = producer.wait(timeout=60)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
    # then it exits 130 saying so, with no process and no temp folder left behind
    errors = (tmp_path / "stderr").read_text()
    assert code == exitcodes.INTERRUPTED, errors
    assert "interrupted" in errors.strip().splitlines()[-1]
    run.assert_nothing_left()
    # and no output that looks complete
    assert not out.exists() and not Path(f"{out}.manifest.json").exists()


def test_workers_that_cannot_start_end_the_job_quickly_with_their_reason(tiny_bert: Path, tmp_path: Path) -> None:
    # given a batch budget whose activations fit on no machine (10^9 tokens: terabytes), so that the
    # workers' memory check fails for real
    run = Run(tmp_path)
    corpus = _corpus(tmp_path / "corpus.jsonl", 50)
    out = tmp_path / "out.npy"
    # when an embedded job is started
    args = ("embed", str(corpus), "-o", str(out), "--model", str(tiny_bert), "--batch-tokens", str(10**9))
    result = run_embedq(*args, env=run.env, timeout=120)
    # then it ends (no hang) with the workers' exit code and their one-line reason
    assert result.returncode == exitcodes.WORKERS, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("embedq: error: model tiny-bert") and "is available" in last, result.stderr
    run.assert_nothing_left()
    assert not out.exists() and not list(tmp_path.glob("out.npy.*"))


def _with_bad_record(path: Path, rows: int, bad_line: int) -> Path:
    """A corpus of `rows` valid records, except line `bad_line` (1-based), which has no text field."""
    _corpus(path, rows)
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[bad_line - 1] = json.dumps({"id": "no-text"})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("problem", "code"),
    [
        # found by the checks that run while the workers boot
        ("bad first record", exitcodes.INPUT),
        ("output is a folder", exitcodes.USAGE),
        # found by the job as it streams the input, with chunks already sent
        ("bad record mid-stream", exitcodes.INPUT),
    ],
)
def test_a_problem_found_after_the_workers_started_exits_with_its_code_and_leaves_nothing(
    tiny_bert: Path, tmp_path: Path, problem: str, code: int
) -> None:
    # given an embedded job with one problem that only reading the input or the output folder finds
    run = Run(tmp_path)
    corpus = _corpus(tmp_path / "corpus.jsonl", 200)
    out = tmp_path / "out.npy"
    if problem == "bad first record":
        _with_bad_record(corpus, 200, bad_line=3)
    elif problem == "output is a folder":
        out.mkdir()
    else:
        _with_bad_record(corpus, 200, bad_line=150)  # past the first chunk, which is checked before the job
    # when it is run with --on-invalid fail (the default)
    args = ("embed", str(corpus), "-o", str(out), "--model", str(tiny_bert), "--chunk-size", "32", "--workers", "1")
    result = run_embedq(*args, env=run.env, timeout=120)
    # then it exits with that problem's code and one line saying what it is
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("embedq: error: "), result.stderr
    if problem != "bad record mid-stream":
        assert len(lines) == 1, result.stderr  # nothing else is said before a job starts
    # and the server and workers started for it are stopped, with their temp folder removed
    run.assert_nothing_left()
    assert not list(tmp_path.glob("out.npy.*"))
