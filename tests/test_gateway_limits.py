"""Slow, vanishing and too many clients against real `embedq serve` processes, over raw loopback sockets.

Two gateways in front of one real worker (tiny BERT): `slow` with 1-second header, body and keep-alive
timeouts, and `tight` with room for one request in flight, one waiting and 16 connections. Each test
says what a hostile client does and checks what the gateway answers, or that it closes the socket.
The last test drives the gateway's admission (producer/serve/limits.py) in-process, a burst within
one turn of a real event loop, which a socket test can provoke only by chance.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.serve.limits import Admission, Overloaded
from tests.conftest import Broker, wait_until
from tests.serving import Fleet, http

#: Far above the 1 s timeouts: a socket still open after this long was never going to be closed.
CLOSE_WITHIN_S = 15.0
#: How long a request let in may wait on a frozen worker in the burst test (bounded, far above what it takes).
HELD_S = 90.0


@pytest.fixture(scope="module")
def fleet(valkey: object, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    serving = Fleet(valkey.url, tiny_bert, tmp_path_factory.mktemp("limits"))  # type: ignore[attr-defined]
    try:
        serving.start_worker()
        serving.slow = serving.start_gateway(  # type: ignore[attr-defined]
            "--header-timeout", "1", "--body-timeout", "1", "--keep-alive-timeout", "1"
        )
        serving.tight = serving.start_gateway(  # type: ignore[attr-defined]
            "--max-concurrency", "1", "--max-waiting", "1", "--max-connections", "16", "--header-timeout", "60"
        )
        yield serving
    finally:
        serving.stop()
        Broker(valkey.url, serving.prefix, "valkey").cleanup()  # type: ignore[attr-defined]


def connect(base: str, timeout_s: float = CLOSE_WITHIN_S) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection; fails if it stays open too long."""
    received = b""
    while True:
        try:
            part = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the gateway kept a stalled connection open over {CLOSE_WITHIN_S} s; got {received!r}")
        except ConnectionResetError:
            return received
        if not part:
            return received
        received += part


def response_of(raw: bytes) -> tuple[int, dict[str, str], object]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


def post_head(length: int) -> bytes:
    return (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_a_client_that_connects_and_sends_nothing_is_closed(fleet: Fleet) -> None:
    with connect(fleet.slow) as sock:  # type: ignore[attr-defined]
        assert read_until_closed(sock) == b""


def test_headers_trickled_a_byte_at_a_time_do_not_keep_a_connection_open(fleet: Fleet) -> None:
    # given a client sending its request line slower than the header timeout allows, byte by byte
    with connect(fleet.slow) as sock:  # type: ignore[attr-defined]
        started = time.monotonic()
        closed = False
        for byte in b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n":
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.2)
            if time.monotonic() - started > CLOSE_WITHIN_S:
                break
        # then the gateway closed it although bytes kept coming
        assert closed or read_until_closed(sock) == b""


def test_a_body_that_stalls_gets_408_and_the_connection_is_closed(fleet: Fleet) -> None:
    with connect(fleet.slow) as sock:  # type: ignore[attr-defined]
        sock.sendall(post_head(100) + b'{"input": "half a bo')
        status, headers, body = response_of(read_until_closed(sock))
    assert status == 408 and headers["connection"] == "close"
    assert body["error"]["code"] == "body_timeout" and "not complete within 1 s" in body["error"]["message"]  # type: ignore[index]


def test_an_idle_keep_alive_connection_is_closed_after_a_response(fleet: Fleet) -> None:
    with connect(fleet.slow) as sock:  # type: ignore[attr-defined]
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 200") and b'"object":"list"' in raw


def test_a_client_hanging_up_mid_body_is_one_line_in_the_log_and_the_gateway_carries_on(fleet: Fleet) -> None:
    for _ in range(3):
        with connect(fleet.slow) as sock:  # type: ignore[attr-defined]
            sock.sendall(post_head(1000) + b'{"input": ["gone')
            time.sleep(0.1)
    log = fleet.logs[1]
    assert wait_until(lambda: log.read_text().count("hung up after") >= 3, 10), log.read_text()
    assert "Traceback" not in log.read_text() and "Exception in ASGI" not in log.read_text()
    assert http("POST", f"{fleet.slow}/v1/embeddings", {"input": "still here"})[0] == 200  # type: ignore[attr-defined]


def test_bytes_that_are_not_http_get_an_openai_shaped_400(fleet: Fleet) -> None:
    with connect(fleet.slow) as sock:  # type: ignore[attr-defined]
        sock.sendall(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
        status, _, body = response_of(read_until_closed(sock))
    assert status == 400 and body["error"]["code"] == "invalid_http"  # type: ignore[index]


def answered(futures: list[concurrent.futures.Future[tuple[int, object, str | None]]]) -> list[int]:
    """The statuses of the requests answered so far (a request that failed is not an answer)."""
    return [future.result()[0] for future in futures if future.done() and future.exception() is None]


def test_past_the_concurrency_limit_requests_get_429_with_retry_after_and_the_rest_200(fleet: Fleet) -> None:
    # given a gateway with one slot and one place in line, and its worker frozen (SIGSTOP, main process and child),
    # so that the two requests it lets in hold their places however fast this machine embeds (sent together and
    # unfrozen, a quick machine answered each request before the next one arrived: no 429, a flaky test)
    together = threading.Barrier(12)
    # (one request first, so that whatever the gateway sets up on its first request is behind it)
    assert http("POST", f"{fleet.tight}/v1/embeddings", {"input": "warm"})[0] == 200  # type: ignore[attr-defined]

    def ask(i: int) -> tuple[int, object, str | None]:
        # The two let in wait for as long as the worker stays frozen: not a stalled connection.
        with connect(fleet.tight, timeout_s=HELD_S) as sock:  # type: ignore[attr-defined]
            body = json.dumps({"input": [f"burst text {i} {j} " * 8 for j in range(32)]}).encode()
            together.wait(timeout=30)
            sock.sendall(post_head(len(body)).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + body)
            status, headers, payload = response_of(read_until_closed(sock))
            return status, payload, headers.get("retry-after")

    worker = fleet.processes[0]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            # when 12 clients ask at once
            futures = [pool.submit(ask, i) for i in range(12)]
            # then the ten beyond the slot and the line are answered while the worker cannot have served any
            assert wait_until(lambda: len(answered(futures)) >= 10, HELD_S / 2), (
                f"{answered(futures)}\n{fleet.output()}"
            )
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        answers = [future.result() for future in futures]
    # and, once the worker is back, the two that were let in get their vectors
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * 2 + [429] * 10, statuses
    for status, payload, retry_after in answers:
        if status == 429:
            assert retry_after == "1" and payload["error"]["code"] == "gateway_busy", payload  # type: ignore[index]
        else:
            assert len(payload["data"]) == 32, payload  # type: ignore[index]


def test_past_the_connection_limit_a_request_gets_429_and_the_gateway_recovers(fleet: Fleet) -> None:
    # given 16 connections held open without a request
    idle = [connect(fleet.tight) for _ in range(16)]  # type: ignore[attr-defined]
    try:
        # when one more client asks, then it is refused with 429, Retry-After, and closed
        with connect(fleet.tight) as sock:  # type: ignore[attr-defined]
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = response_of(read_until_closed(sock))
        assert status == 429 and headers["retry-after"] == "1" and headers["connection"] == "close"
        assert body["error"]["code"] == "too_many_connections"  # type: ignore[index]
    finally:
        for sock in idle:
            sock.close()
    # and once they are gone, requests are served again
    assert wait_until(lambda: http("GET", f"{fleet.tight}/v1/models")[0] == 200, 10)  # type: ignore[attr-defined]


def test_a_burst_within_one_turn_of_the_event_loop_gets_one_slot_one_place_in_line_and_429s() -> None:
    # given the gateway's admission with one slot and one place in line, and 12 requests that all reach it before
    # the event loop turns (as a burst of connections read in one go does)
    async def burst() -> tuple[int, int, int]:
        admission = Admission(1, 1, max_wait_s=30)
        release = asyncio.Event()
        outcomes: list[str] = []

        async def request() -> None:
            try:
                async with admission.slot():
                    outcomes.append("in")
                    await release.wait()
            except Overloaded:
                outcomes.append("429")

        tasks = [asyncio.create_task(request()) for _ in range(12)]
        for _ in range(50):  # a few turns of the loop: every request has been let in, queued or refused
            await asyncio.sleep(0)
        refused, inside = outcomes.count("429"), outcomes.count("in")
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        return refused, inside, outcomes.count("in")

    # then one is inside, one waits, ten are refused at once; the one waiting gets in once the first is done
    assert asyncio.run(burst()) == (10, 1, 2)
