"""`embedq up` as a hostile local client finds it: bad bytes, a burst of 1,000 requests, no credentials.

One real stack for the module (embedded Valkey, one worker with a tiny BERT, Flower, the gateway
under uvicorn), all on loopback. What must hold: `/v1/*` answers 200 or an OpenAI-shaped 4xx to
anything (explicit cases, then Hypothesis-generated bodies); a burst is all 200 or 429 with
Retry-After and the gateway is healthy afterwards; the broker and Flower refuse strangers.
"""

from __future__ import annotations

import asyncio
import base64
import http.client as httpc
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import wait_until
from tests.serving import UpStack, embedq_up, http, responds

pytestmark = pytest.mark.slow

BURST = 1000


@pytest.fixture(scope="module")
def stack(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpStack]:
    folder = tmp_path_factory.mktemp("up-hostile")
    with embedq_up(folder, tiny_bert, "--workers", "1", "--interactive-workers", "0") as up:
        up.wait_ready()
        yield up


def send(
    stack: UpStack, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or raw text) of one request on its own connection."""
    connection = httpc.HTTPConnection("127.0.0.1", stack.port, timeout=60)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {"Host": "127.0.0.1", "Content-Length": str(len(body)), **(headers or {})}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        raw = response.read()
        found = {name.lower(): value for name, value in response.getheaders()}
    finally:
        connection.close()
    try:
        return response.status, found, json.loads(raw)
    except ValueError:
        return response.status, found, raw.decode("latin-1")


def assert_answered(status: int, headers: dict[str, str], body: Any, inputs: int | None = None) -> None:
    """200 with one vector per input, or a 4xx in OpenAI's error shape; never a 5xx, never a redirect."""
    assert status < 500 and not 300 <= status < 400, (status, body)
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body)
    if status == 200:
        assert body["object"] == "list"
        if inputs is not None:
            assert len(body["data"]) == inputs
        return
    assert 400 <= status < 500
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if status == 429:
        assert headers.get("retry-after"), headers


DEEP = 5000
HOSTILE_BODIES = {
    "lone surrogate, single string": b'{"input": "a \\ud800 b"}',
    "lone surrogate, list item": b'{"input": ["fine", "\\udfff"]}',
    "deep nesting": b'{"input": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "deep nesting of objects": b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
    "surrogate in dimensions": b'{"input": "x", "dimensions": "\\udc00"}',
    "dimensions true": b'{"input": "x", "dimensions": true}',
    "dimensions float": b'{"input": "x", "dimensions": 1.5}',
    "dimensions negative": b'{"input": "x", "dimensions": -3}',
    "dimensions huge": b'{"input": "x", "dimensions": 1' + b"0" * 40 + b"}",
    "dimensions infinite": b'{"input": "x", "dimensions": 1e999}',
    "dimensions object": b'{"input": "x", "dimensions": {"a": [1]}}',
    "int digits over the limit": b'{"input": "x", "dimensions": ' + b"9" * 5000 + b"}",
    "model number": b'{"input": "x", "model": 5}',
    "model list": b'{"input": "x", "model": ["a"]}',
    "model surrogate": b'{"input": "x", "model": "\\ud800"}',
    "encoding_format surrogate": b'{"input": "x", "encoding_format": "\\ud800"}',
    "encoding_format list": b'{"input": "x", "encoding_format": ["float"]}',
    "input number": b'{"input": 5}',
    "input true": b'{"input": true}',
    "input object": b'{"input": {"text": "x"}}',
    "input null": b'{"input": null}',
    "input empty list": b'{"input": []}',
    "input list of empty lists": b'{"input": [[]]}',
    "input token ids": b'{"input": [1, 2, 3]}',
    "input booleans": b'{"input": [true, false]}',
    "input with a null item": b'{"input": ["a", null]}',
    "input NaN": b'{"input": NaN}',
    "empty body": b"",
    "null body": b"null",
    "list body": b'["x"]',
    "string body": b'"x"',
    "not UTF-8": b'{"input": "\xff\xfe"}',
    "UTF-16 BOM": "\ufeff{}".encode("utf-16"),
    "truncated": b'{"input": "x"',
    "NUL bytes": b'{"input": "x\x00"}\x00',
    "the most work one body can ask for": json.dumps({"input": ["long words " * 360] * 2048}).encode(),
}


@pytest.mark.parametrize("body", HOSTILE_BODIES.values(), ids=HOSTILE_BODIES.keys())
def test_hostile_bodies_get_200_or_an_openai_shaped_4xx(stack: UpStack, body: bytes) -> None:
    assert_answered(*send(stack, "POST", "/v1/embeddings", body, {"Content-Type": "application/json"}))


HOSTILE_REQUESTS = {
    "trailing slash with a foreign Host": ("POST", "/v1/embeddings/", {"Host": "evil.example"}),
    "unknown path": ("GET", "/v1/nope", {}),
    "unknown path outside /v1": ("GET", "/admin", {}),
    "GET on embeddings": ("GET", "/v1/embeddings", {}),
    "DELETE on models": ("DELETE", "/v1/models", {}),
    "POST on models": ("POST", "/v1/models", {}),
    "a declared body over the limit": ("POST", "/v1/embeddings", {"Content-Length": str(10**12)}),
    "a dot-dot path": ("GET", "/v1/../v1/models/../../etc/passwd", {}),
}


@pytest.mark.parametrize("request_", HOSTILE_REQUESTS.values(), ids=HOSTILE_REQUESTS.keys())
def test_wrong_paths_methods_and_headers_get_openai_shaped_4xx_and_no_redirect(
    stack: UpStack, request_: tuple[str, str, dict[str, str]]
) -> None:
    method, path, headers = request_
    status, found, body = send(stack, method, path, b'{"input": "x"}', headers)
    assert_answered(status, found, body)
    assert status != 200 and "location" not in found


texts = st.text(st.characters(exclude_categories=()), max_size=24)  # surrogates included
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "input": texts | st.lists(texts, min_size=1, max_size=4) | values,
        "model": values,
        "encoding_format": st.sampled_from(["float", "base64", None]) | values,
        "dimensions": st.integers(-2, 64) | values,
        "user": values,
    },
)


def inputs_of(body: Any) -> int | None:
    raw = body.get("input") if isinstance(body, dict) else None
    return 1 if isinstance(raw, str) else len(raw) if isinstance(raw, list) else None


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, extra=st.dictionaries(texts, values, max_size=2))
def test_generated_json_bodies_get_200_or_an_openai_shaped_4xx(
    stack: UpStack, body: dict[str, Any], extra: dict[str, Any]
) -> None:
    request = {**extra, **body}
    status, headers, answer = send(stack, "POST", "/v1/embeddings", json.dumps(request).encode())
    assert_answered(status, headers, answer, inputs_of(request) if status == 200 else None)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=300) | st.text(max_size=100).map(lambda text: text.encode("utf-8", "surrogatepass")))
def test_generated_bytes_get_an_openai_shaped_answer(stack: UpStack, raw: bytes) -> None:
    assert_answered(*send(stack, "POST", "/v1/embeddings", raw))


async def one_request(port: int, text: str) -> tuple[int, str | None]:
    """(status, Retry-After) of one POST on its own connection, read to the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"input": text}).encode()
    writer.write(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    raw = await asyncio.wait_for(reader.read(), 120)
    writer.close()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in head[1:])}
    return int(head[0].split()[1]), headers.get("retry-after")


def test_a_burst_of_1000_parallel_distinct_requests_is_all_200_or_429_and_the_gateway_stays_healthy(
    stack: UpStack,
) -> None:
    async def burst() -> list[tuple[int, str | None]]:
        return await asyncio.gather(*(one_request(stack.port, f"burst request number {i}") for i in range(BURST)))

    answers = asyncio.run(burst())
    statuses = {status for status, _ in answers}
    assert statuses <= {200, 429}, sorted(statuses)
    assert all(retry_after for status, retry_after in answers if status == 429)
    assert sum(status == 200 for status, _ in answers) > 0
    assert http("GET", f"{stack.base}/health")[0] == 200
    assert http("POST", f"{stack.base}/v1/embeddings", {"input": "after the burst"})[0] == 200


def test_the_embedded_valkey_refuses_a_local_process_without_the_password(stack: UpStack) -> None:
    url = stack.broker_url()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    stranger = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=5)
    with pytest.raises(redis.exceptions.AuthenticationError):
        stranger.lpush("embedq:interactive", "a task from a stranger")
    stranger.close()
    # the URL file and the server's config (which holds the password) are readable by this user only
    folder = Path(stack.printed().split("the full URL is in ", 1)[1].split(",", 1)[0]).parent
    for secret in (folder / "broker.url", folder / "valkey" / "valkey.conf"):
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600, secret
    # and no process of the stack carries it in its argv, which every local user can read
    password = url.split("@")[0].rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                assert password.encode() not in (entry / "cmdline").read_bytes(), entry
            except OSError:
                continue
    assert redis.Redis.from_url(url).ping()


def test_flower_asks_for_the_credential_embedq_up_printed(stack: UpStack) -> None:
    flower = f"http://127.0.0.1:{stack.flower_port}"
    user, password = stack.flower_auth()
    assert wait_until(lambda: responds(f"{flower}/"), 60), stack.printed()
    assert http("GET", f"{flower}/api/workers")[0] == 401
    assert http("GET", f"{flower}/api/workers", headers=basic(user, "wrong"))[0] == 401
    assert http("GET", f"{flower}/api/workers", headers=basic(user, password))[0] == 200


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
