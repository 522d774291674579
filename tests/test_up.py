"""`embedq up` as an operator runs it: everything starts, Flower shows the work, Ctrl-C stops it all.

Flower is checked the way an operator sees it, in a real browser: Debian's headless Chromium loads
its pages (JavaScript and all), dumps the DOM and takes a screenshot. Locally a missing Chromium
skips that part; in CI (CI=true) it fails, since `make test` installs it there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.local.embedded_redis import free_port
from tests.conftest import run_embedq, wait_until
from tests.serving import UpStack, embedq_up, responds
from tests.test_cli_first_hour import user_env
from workers.protocol.keys import redact


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browse(url: str, profile: Path, screenshot: Path | None = None) -> str:  # noqa: D417
    """The DOM of `url` after its scripts ran (and a PNG of it), from headless Chromium."""
    binary = chromium()
    assert binary
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=8000",
        "--window-size=1400,1000",
    ]
    if screenshot is not None:
        subprocess.run([binary, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=90)
    done = subprocess.run([binary, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=90)
    return done.stdout


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, grandchildren...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def up(tmp_path: Path, tiny_bert: Path) -> Iterator[UpStack]:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    flags = ("--broker-port", str(free_port()), "--workers", "1", "--interactive-workers", "0")
    with embedq_up(tmp_path, tiny_bert, *flags, env={"XDG_RUNTIME_DIR": str(runtime)}) as stack:
        yield stack


def test_up_serves_flower_shows_the_work_and_ctrl_c_stops_everything(
    up: UpStack, tmp_path: Path, tiny_bert: Path
) -> None:
    process, log, port, flower_port = up.process, up.log, up.port, up.flower_port
    # given `embedq up` has printed where everything is, and the gateway's health turned green
    up.wait_ready()
    printed = up.printed()
    # it said "ready" only once the gateway's health was green, and printed where everything is after that
    assert printed.index("embedq up: ready") < printed.index(f"http://127.0.0.1:{port}"), printed
    assert f"http://127.0.0.1:{flower_port}" in printed
    # the broker's password is printed nowhere: tools read the URL from the file it names
    broker_url = up.broker_url()
    assert broker_url.split("@")[0].split(":")[-1] not in printed
    broker_port = process.args[process.args.index("--broker-port") + 1]  # type: ignore[index,union-attr]
    assert broker_url.endswith(f"@127.0.0.1:{broker_port}/0"), broker_url
    url_file = re.search(r"the full URL is in (\S+),", printed).group(1)  # type: ignore[union-attr]
    assert f"EmbedClient(open({url_file!r}).read().strip())" in printed and "status   embedq status" in printed
    # when a corpus job runs through the stack
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"flower should show document {i}\n" for i in range(24)), encoding="utf-8")
    job = run_embedq(
        "embed",
        str(corpus),
        "-o",
        str(tmp_path / "out.npy"),
        "--broker",
        broker_url,
        "--model",
        str(tiny_bert),
        "--chunk-size",
        "8",
    )
    assert job.returncode == 0, job.stderr
    # then `embedq status` with no --broker finds the private Valkey of this `embedq up` and lists the job
    status = subprocess.run(
        [str(Path(sys.executable).parent / "embedq"), "status"], env=user_env(tmp_path), capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    assert f"broker: {redact(broker_url)} (the embedded Valkey of `embedq up` (pid {process.pid}))" in status.stdout
    assert any(str(corpus) in row and " done " in row for row in status.stdout.splitlines()), status.stdout
    assert wait_until(lambda: responds(f"http://127.0.0.1:{flower_port}/"), 60)
    user, password = up.flower_auth()
    flower = f"http://{user}:{password}@127.0.0.1:{flower_port}"

    # then Flower, seen in a real browser, lists the worker and the job's tasks with readable arguments
    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is required in CI for the Flower check (make test installs it)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); Flower browser check skipped")
    else:
        workers_dom = browse(f"{flower}/workers", tmp_path / "profile1")
        assert f"embedq-up-{process.pid}@" in workers_dom, workers_dom[-2000:]
        shots = [tmp_path / "flower-tasks.png", tmp_path / "flower-task.png"]
        tasks_dom = browse(f"{flower}/tasks", tmp_path / "profile2", screenshot=shots[0])
        assert "embedq.embed_chunk" in tasks_dom and "SUCCESS" in tasks_dom, tasks_dom[-2000:]
        task_ids = sorted(set(re.findall(r"\b[0-9a-f]{16}-[0-9]+-[0-9]+\b", tasks_dom)))
        assert len(task_ids) == 3, task_ids  # 24 docs in chunks of 8
        # a task's page: readable arguments (texts abbreviated) and the result's rows, tokens and ms
        task_dom = browse(f"{flower}/task/{task_ids[0]}", tmp_path / "profile3", shots[1])
        assert "flower should show document" in task_dom and "(8 texts)" in task_dom and "+5 more" in task_dom
        assert "'rows': 8" in task_dom and "'tokens':" in task_dom and "'ms':" in task_dom, task_dom[-3000:]
        for shot in shots:
            assert shot.exists() and shot.stat().st_size > 10_000
            if os.environ.get("TESTS_ARTIFACTS_DIR"):  # keep the screenshots for a human (CI artifacts)
                shutil.copy(shot, Path(os.environ["TESTS_ARTIFACTS_DIR"]) / shot.name)

    # and Ctrl-C stops every process it started
    started = descendants(process.pid)
    assert len(started) >= 4, started  # valkey, worker (+ child), flower, gateway
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert wait_until(lambda: not any(alive(pid) for pid in started), 30), [p for p in started if alive(p)]
    assert "interrupted; stopped everything" in log.read_text()
