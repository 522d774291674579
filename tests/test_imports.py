"""The Celery parent, the producer and the encoder core never import torch or transformers (fork safety, start-up
time: a child on OpenVINO or ONNX Runtime runs without them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCER_MODULES = sorted(f"producer.{p.stem}" for p in (ROOT / "producer").glob("*.py") if p.stem != "__main__")
LIGHT_MODULES = ["workers.app", "workers.tasks", "workers.encoder", "workers.runtime", *PRODUCER_MODULES]
HEAVY = ("torch", "transformers", "sentence_transformers")


def _heavy_after_importing(*modules: str) -> list[str]:
    """Heavy packages in sys.modules of a fresh interpreter after importing `modules`."""
    code = (
        f"import json, sys; import {', '.join(modules)}; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def test_workers_app_and_every_producer_module_leave_torch_and_transformers_out() -> None:
    # given a fresh interpreter, when workers.app and every producer module are imported
    heavy = _heavy_after_importing(*LIGHT_MODULES)
    # then no heavy ML package came with them (all at once is a superset of each alone: one process is enough,
    # and only on failure is each module tried alone, to name the culprit)
    if heavy:
        culprits = {m: found for m in LIGHT_MODULES if (found := _heavy_after_importing(m))}
        raise AssertionError(f"importing these modules pulls in {heavy}: {culprits}")


def test_the_check_itself_sees_torch_when_it_is_imported() -> None:
    # guards the test above against passing vacuously
    assert "torch" in _heavy_after_importing("workers.encoder.torch_backend")
