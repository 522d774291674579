"""Shared fixtures: real Redis-protocol servers, real worker processes, tiny models; all torn down.

Servers: the embedded Valkey always; the machine's Redis too when TESTS_REDIS_URL is set
(CI sets it). Each test gets its own key prefix and deletes its keys afterwards. Test-only variables
never start with EMBEDQ_: workers refuse unknown EMBEDQ_* names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from producer.local.cluster import worker_command
from producer.local.embedded_redis import EmbeddedRedis
from producer.local.processes import start_process, stop_process
from workers.protocol.config import Settings
from workers.protocol.model_info import default_model_path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Stop at once, in one line, when an environment still sets the test variables of old."""
    legacy = sorted(name for name in os.environ if name.startswith("EMBEDQ_TEST_"))
    if legacy:
        raise pytest.UsageError(
            f"{', '.join(legacy)}: test variables no longer start with EMBEDQ_ (workers refuse unknown EMBEDQ_* "
            "names); use TESTS_REDIS_URL and TESTS_ARTIFACTS_DIR, and tests/faults/fault_app.py for faults"
        )


def _server_params() -> list[str]:
    params = ["valkey"]
    if os.environ.get("TESTS_REDIS_URL"):
        params.append("redis")
    return params


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("valkey")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def machine_redis_url() -> str:
    url = os.environ.get("TESTS_REDIS_URL", "")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.exceptions.RedisError as error:
        # Locally a missing server skips; in CI it must be there, so its absence fails the run.
        if os.environ.get("CI"):
            pytest.fail(f"TESTS_REDIS_URL={url} does not answer in CI: {error}")
        pytest.skip(f"no Redis at TESTS_REDIS_URL={url}")
    return url


@dataclass
class Broker:
    """A Redis-protocol server URL with a key prefix that is this test's alone."""

    url: str
    prefix: str
    kind: str

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def settings(self, **changes: object) -> Settings:
        return Settings(broker_url=self.url, key_prefix=self.prefix).replace(**changes)

    def env(self, **changes: object) -> dict[str, str]:
        return self.settings(**changes).to_env()

    def cleanup(self) -> None:
        client = self.client()
        for key in client.scan_iter(match=f"{self.prefix}:*", count=1000):
            client.delete(key)
        client.close()


def make_broker(request: pytest.FixtureRequest, kind: str) -> Broker:
    """A Broker on server `kind` ("valkey" or "redis") with a fresh key prefix; the caller cleans up."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if kind == "valkey":
        return Broker(request.getfixturevalue("valkey").url, prefix, "valkey")
    return Broker(request.getfixturevalue("machine_redis_url"), prefix, "redis")


@pytest.fixture(params=_server_params())
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """Each test runs against the embedded Valkey, and against the machine's Redis when configured."""
    result = make_broker(request, request.param)
    yield result
    result.cleanup()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with the MiniLM tokenizer, random weights (fixed seed): fast to load."""
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    source = default_model_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    hostname: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None if the worker is still running after `timeout_s` (so a test can show its log)."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]


@dataclass
class WorkerFactory:
    """Starts real `celery -A APP worker` processes; stops every one of them at teardown."""

    tmp_path: Path
    started: list[WorkerProcess] = field(default_factory=list)
    #: The Celery app module: the production one, or the fault tests' (tests/faults/fault_app.py).
    app: str = "workers.app"

    def start(
        self,
        env: dict[str, str],
        *,
        pool: str = "prefork",
        concurrency: int = 1,
        extra_args: list[str] | None = None,
        wait_ready: Callable[[], bool] | None = None,
    ) -> WorkerProcess:
        hostname = f"w{len(self.started)}-{uuid.uuid4().hex[:6]}@test"
        log_path = self.tmp_path / f"{hostname.split('@')[0]}.log"
        command = worker_command(concurrency, pool, hostname=hostname, loglevel="INFO", app=self.app)
        command += extra_args or []
        full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        worker = WorkerProcess(start_process(command, env=full_env, log_path=log_path), log_path, hostname)
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            stop_process(worker.process, timeout_s=10)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerFactory]:
    factory = WorkerFactory(tmp_path)
    yield factory
    factory.stop_all()


def run_embedq(
    *args: str, env: dict[str, str] | None = None, timeout: float = 240, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `embedq` command line in a subprocess, as a user would."""
    if args[:1] == ("embed",) and "--broker" in args and not {"--wait-for-workers", "--no-worker-check"} & set(args):
        # Tests start workers and the producer together: the producer waits for them, as such a user would ask.
        args = (*args, "--wait-for-workers", "120")
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")},
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin.decode() if stdin is not None else None,
    )


def write_texts_jsonl(path: Path, texts: list[str]) -> Path:
    """A JSONL corpus of `texts` with ids doc-0, doc-1, ... in order."""
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    return path


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return False
