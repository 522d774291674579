"""Load on one gateway: p50/p95/p99 and the 429 share at 50, 200 and 1,000 parallel clients, with wrk.

    apt-get install -y wrk
    .venv/bin/python bench/load.py [--clients 50 200 1000] [--duration 15] [--model PATH] [-- up flags]

Starts `embedq up` on loopback (embedded Valkey, workers, Flower, the gateway; the packaged MiniLM by
default), waits for GET /health, then runs wrk (a C load generator, closed loop: every client sends
its next request as soon as the last one is answered) for `--duration` seconds per client count. Each
request embeds a one-sentence text no other request sends, so the cache never answers. Prints a
Markdown table; any status other than 200 or 429, any 429 without Retry-After and any wrk timeout or
socket error are counted in their own columns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producer.local.embedded_redis import free_port  # noqa: E402
from producer.local.processes import start_process, stop_process  # noqa: E402


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
            return int(response.status) == 200
    except OSError:
        return False


def start_up(model: str | None, extra: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "producer.cli", "up", "--port", str(port), "--flower-port", str(free_port())]
    argv += (["--model", model] if model else []) + extra
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    process = start_process(argv, env=env, log_path=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while not healthy(base):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, timeout_s=30)
            sys.exit(f"load: embedq up did not become healthy: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    return process, base


def run_wrk(base: str, clients: int, duration_s: int) -> dict[str, object]:
    """One wrk run; its JSON summary line (see bench/load.lua)."""
    argv = [
        "wrk",
        "-t2",
        f"-c{clients}",
        f"-d{duration_s}s",
        "--timeout",
        "120s",
        "-s",
        str(ROOT / "bench" / "load.lua"),
        f"{base}/v1/embeddings",
        "--",
        uuid.uuid4().hex[:12],
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 300)
    found = re.search(r"^EMBEDQ-LOAD (\{.*\})$", done.stdout, re.M)
    if not found:
        sys.exit(f"load: wrk gave no summary (exit {done.returncode}): {done.stdout[-1500:]} {done.stderr[-1500:]}")
    return json.loads(found.group(1))  # type: ignore[no-any-return]


def row(clients: int, result: dict[str, object]) -> str:
    statuses: dict[str, int] = result["statuses"]  # type: ignore[assignment]
    errors: dict[str, int] = result["errors"]  # type: ignore[assignment]
    answered = sum(statuses.values())
    shed = statuses.get("429", 0)
    other = answered - statuses.get("200", 0) - shed
    seconds = int(result["duration_us"]) / 1e6  # type: ignore[call-overload]
    ms = {key: int(result[key]) / 1000 for key in ("p50_us", "p95_us", "p99_us")}  # type: ignore[call-overload]
    return (
        f"| {clients:,} | {answered:,} | {answered / seconds:.1f} | {ms['p50_us']:.0f} | {ms['p95_us']:.0f} | "
        f"{ms['p99_us']:.0f} | {100 * shed / max(1, answered):.1f}% | {other} | {result['retry_after_missing']} | "
        f"{sum(errors.values())} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--duration", type=int, default=15, help="seconds of load per client count")
    parser.add_argument("--model", default=None, help="model folder (default: the packaged MiniLM)")
    parser.add_argument("up_flags", nargs="*", help="more `embedq up` flags, after --")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("load: wrk is not installed: apt-get install -y wrk")
    log = Path(f"/tmp/embedq-load-{os.getpid()}.log")
    process, base = start_up(args.model, args.up_flags, log)
    try:
        lines = [
            f"`embedq up` {' '.join(args.up_flags)} on {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f} at start; wrk -t2, {args.duration} s per row, distinct one-sentence texts",
            "",
            "| clients | answered | req/s | p50 ms | p95 ms | p99 ms | 429 share | other status | 429 without "
            "Retry-After | wrk errors |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        print("\n".join(lines), flush=True)
        for clients in args.clients:
            result = run_wrk(base, clients, args.duration)
            lines.append(row(clients, result))
            print(lines[-1], flush=True)
            if not healthy(base):
                print(f"load: /health is not 200 after {clients} clients", flush=True)
        print(f"(gateway healthy afterwards: {healthy(base)}; load average {os.getloadavg()[0]:.1f} at the end)")
    finally:
        stop_process(process, timeout_s=30)


if __name__ == "__main__":
    main()
