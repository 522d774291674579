"""Local adapters for docker-compose.yml's `gateway` and `prometheus` services (used by test_compose.py).

The gateway's own command runs against the local stand-in of the redis service; Prometheus runs
Debian's `prometheus` binary on ops/prometheus.yml with the compose host names pointed at local
ports, and must report both scrape targets (the gateway and Flower) up.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request
import uuid
from typing import Any

import pytest

from producer.local.embedded_redis import free_port
from tests.conftest import ROOT, wait_until
from tests.serving import http, responds


def _with_port(argv: list[str], flag: str, port: int) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = str(port)
    return out


def start_gateway(local: Any) -> int:
    """The gateway service's command on a free local port; returns the port once it answers."""
    from tests.test_compose import service

    spec = service("gateway")
    argv = [local.localize(arg) for arg in spec["command"]]
    assert argv[:2] == ["embedq", "serve"], argv
    port = free_port()
    argv = _with_port(_with_port(argv, "--port", port), "--host", 0)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    env = local.python_env(spec, EMBEDQ_KEY_PREFIX=f"t{uuid.uuid4().hex[:10]}")
    log = local.start("gateway", [sys.executable, "-m", "producer.cli", *argv[1:]], env)
    assert wait_until(lambda: responds(f"http://127.0.0.1:{port}/v1/models"), 60), log.read_text(errors="replace")
    return port


def check_gateway(local: Any) -> None:
    """Published on 8000; models and metrics answer; health names the missing workers (none run here)."""
    from tests.test_compose import service

    assert any(str(p).endswith("8000") for p in service("gateway").get("ports", []))
    base = f"http://127.0.0.1:{start_gateway(local)}"
    status, models = http("GET", f"{base}/v1/models")
    assert status == 200 and models["data"][0]["id"] == "all-MiniLM-L6-v2"
    status, metrics = http("GET", f"{base}/metrics")
    assert status == 200 and "embedq_queue_depth" in metrics and "embedq_broker_up 1.0" in metrics
    status, health = http("GET", f"{base}/health")
    assert status == 503 and health["broker"] == "ok" and "no worker answered" in health["reason"]


def start_flower(local: Any) -> int:
    from tests.test_compose import service

    spec = service("flower")
    port = free_port()
    argv = [f"--port={port}" if a == "--port=5555" else a for a in spec["command"][1:]]
    env = local.python_env(spec, EMBEDQ_KEY_PREFIX=f"t{uuid.uuid4().hex[:10]}")
    local.start("flower", [sys.executable, "-m", "celery", *argv, "--address=127.0.0.1"], env)
    assert wait_until(lambda: responds(f"http://127.0.0.1:{port}/metrics"), 60)
    return port


def check_prometheus(local: Any) -> None:
    """ops/prometheus.yml, run by a real Prometheus, scrapes the gateway and Flower successfully."""
    from tests.test_compose import service

    spec = service("prometheus")
    assert spec["image"].startswith("prom/prometheus:")
    assert "./ops/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in spec["volumes"]
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's prometheus is required in CI for this check (make test installs it)")
        pytest.skip("prometheus is not installed (apt-get install -y prometheus)")
    # given the gateway and Flower running locally, and the config with compose host names pointed at them
    gateway_port, flower_port = start_gateway(local), start_flower(local)
    config = (ROOT / "ops" / "prometheus.yml").read_text(encoding="utf-8")
    assert "gateway:8000" in config and "flower:5555" in config
    config = config.replace("gateway:8000", f"127.0.0.1:{gateway_port}").replace(
        "flower:5555", f"127.0.0.1:{flower_port}"
    )
    config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")  # only to keep the test short
    (local.folder / "prometheus.yml").write_text(config, encoding="utf-8")
    # when the service's command runs with that config
    argv = [
        arg.replace("/etc/prometheus/prometheus.yml", str(local.folder / "prometheus.yml")).replace(
            "=/prometheus", f"={local.folder / 'tsdb'}"
        )
        for arg in spec["command"]
    ]
    port = free_port()
    log = local.start("prometheus", [binary, *argv, f"--web.listen-address=127.0.0.1:{port}"], env={})

    def targets_up() -> dict[str, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as response:
                active = json.load(response)["data"]["activeTargets"]
        except OSError:
            return {}
        return {t["labels"]["job"]: t["health"] for t in active}

    # then both jobs are scraped and up
    assert wait_until(lambda: targets_up() == {"embedq": "up", "flower": "up"}, 45), (
        f"{targets_up()}\n{log.read_text(errors='replace')[-2000:]}"
    )
