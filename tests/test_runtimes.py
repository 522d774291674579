"""Choosing an inference runtime, and converting a model for one: cached, atomic, one clear error."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from workers.encoder import Encoder, choose_runtime
from workers.encoder import backend as backend_module
from workers.protocol.config import Settings
from workers.protocol.errors import ConfigError, ModelError
from workers.protocol.model_info import resolve_model

TEXTS = ["a short sentence", "another, longer sentence about the weather in spring", ""]


def _entries(cache: Path) -> list[str]:
    """The cache's entries and temp folders, but for the tokenizer's (workers/encoder/tokenizer.py)."""
    return sorted(path.name for path in cache.iterdir() if not path.name.startswith("tokenizer-"))


def _load_and_encode(model: str, cache: str, barrier: Any, out: str) -> None:
    """In a spawned process: wait for the sibling, then load (converting), encode, and save the rows to `out`."""
    barrier.wait()
    encoder = Encoder.load(resolve_model(model), "cpu", runtime="openvino", threads=1, cache_dir=cache)
    np.save(out, encoder.encode(TEXTS).embeddings)


def test_two_processes_converting_at_once_both_succeed_and_leave_one_entry(tiny_bert: Path, tmp_path: Path) -> None:
    # given an empty conversion cache and two fresh processes released at the same moment
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    outs = [tmp_path / f"rows-{n}.npy" for n in range(2)]
    processes = [
        context.Process(target=_load_and_encode, args=(str(tiny_bert), str(cache), barrier, str(out))) for out in outs
    ]
    # when both load the model for OpenVINO, so both convert it
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(timeout=240)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    assert [process.exitcode for process in processes] == [0, 0]
    first, second = (np.load(out) for out in outs)
    # then both got the same rows, the torch reference's, and the cache holds one finished entry, no temp folder
    np.testing.assert_allclose(first, second, atol=1e-6)
    reference = Encoder.load(resolve_model(str(tiny_bert)), "cpu").encode(TEXTS).embeddings
    np.testing.assert_allclose(first, reference, atol=1e-5)
    (entry,) = _entries(cache)
    assert entry.startswith("openvino-") and (cache / entry / "embedq-key.json").is_file()


def test_a_converted_model_is_reused_until_a_model_file_changes(tiny_bert: Path, tmp_path: Path) -> None:
    # given a model converted once for ONNX Runtime
    model = tmp_path / "model"
    model.mkdir()
    for source in tiny_bert.iterdir():
        (model / source.name).symlink_to(source)
    cache = tmp_path / "cache"
    Encoder.load(resolve_model(str(model)), "cpu", runtime="onnxruntime", cache_dir=str(cache))
    (entry,) = _entries(cache)
    converted_at = (cache / entry / "model.onnx").stat().st_mtime_ns
    # when it is loaded again, then the entry is reused as it is
    Encoder.load(resolve_model(str(model)), "cpu", runtime="onnxruntime", cache_dir=str(cache))
    assert _entries(cache) == [entry] and (cache / entry / "model.onnx").stat().st_mtime_ns == converted_at
    # and when a model file changes, then the next load converts it into a new entry
    (model / "config.json").unlink()
    (model / "config.json").write_text((tiny_bert / "config.json").read_text())
    Encoder.load(resolve_model(str(model)), "cpu", runtime="onnxruntime", cache_dir=str(cache))
    assert len(_entries(cache)) == 2


def test_a_model_that_cannot_be_converted_fails_in_one_line_unless_runtime_is_auto(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.encoder.openvino_backend as openvino_backend

    # given an exporter that cannot handle this model (as for an operator OpenVINO does not know)
    def unsupported(*_: object) -> None:
        raise RuntimeError("Cannot convert operator aten::frobnicate\nlong traceback of the converter")

    monkeypatch.setattr(openvino_backend, "export_wrapper", unsupported)
    info = resolve_model(str(tiny_bert))
    # when the user asked for OpenVINO, then loading fails with one line naming the model, runtime and the way out
    with pytest.raises(ModelError) as caught:
        Encoder.load(info, "cpu", runtime="openvino", cache_dir=str(tmp_path / "cache"))
    message = str(caught.value)
    assert "\n" not in message and info.name in message and "aten::frobnicate" in message
    assert "EMBEDQ_RUNTIME=openvino" in message and "EMBEDQ_RUNTIME=torch" in message
    # and no half-converted entry is left behind
    assert not _entries(tmp_path / "cache")
    # when the runtime is auto, then it falls back to torch and encodes as torch does
    fallback = Encoder.load(info, "cpu", runtime="auto", cache_dir=str(tmp_path / "cache"))
    assert fallback.runtime_name == "torch"
    np.testing.assert_allclose(fallback.encode(TEXTS).embeddings, Encoder.load(info, "cpu").encode(TEXTS).embeddings)


def test_runtime_choice_refuses_what_a_runtime_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # fp32 auto on CPU is the fastest installed exact runtime, and so is bf16 on a CPU with native bf16; CUDA is torch
    assert choose_runtime("auto", "cpu", "fp32") == "openvino"
    monkeypatch.setattr(backend_module, "cpu_has_bf16", lambda: True)
    assert choose_runtime("auto", "cpu", "bf16") == "openvino"
    assert choose_runtime("auto", "cuda", "bf16") == "torch"
    with pytest.raises(ConfigError, match="EMBEDQ_RUNTIME=openvino: runs on CPU only"):
        choose_runtime("openvino", "cuda", "fp32")
    with pytest.raises(ConfigError, match="runs fp32 only, not dtype bf16"):
        choose_runtime("onnxruntime", "cpu", "bf16")
    # on a CPU without native bf16, OpenVINO would run bf16 as f32: refused when asked, resolved to torch by auto
    monkeypatch.setattr(backend_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match="needs a CPU with native bf16"):
        choose_runtime("openvino", "cpu", "bf16")
    assert choose_runtime("auto", "cpu", "bf16") == "torch"
    assert choose_runtime("openvino", "cpu", "fp32") == "openvino"


def test_the_runtime_setting_is_validated() -> None:
    assert Settings.from_env({"EMBEDQ_RUNTIME": "onnxruntime"}).runtime == "onnxruntime"
    assert Settings.from_env({}).runtime == "auto"
    with pytest.raises(ConfigError, match="EMBEDQ_RUNTIME='tensorrt': choose one of auto, torch, openvino"):
        Settings.from_env({"EMBEDQ_RUNTIME": "tensorrt"})
    with pytest.raises(ConfigError, match="runs on CPU only, but EMBEDQ_DEVICE=cuda"):
        Settings.from_env({"EMBEDQ_RUNTIME": "openvino", "EMBEDQ_DEVICE": "cuda"})
    assert os.environ.get("EMBEDQ_RUNTIME") is None


def test_runtime_flag_reaches_the_workers_a_command_starts() -> None:
    from producer.cli.common import settings_from
    from producer.cli.main import build_parser, worker_argv

    # given `embedq worker --runtime openvino` (the same flag `embedq embed` passes to its own workers)
    args = build_parser().parse_args(["worker", "--broker", "redis://127.0.0.1:1/0", "--runtime", "openvino"])
    # when it works out its command line
    _, env, line = worker_argv(args, settings_from(args, {}))
    # then the children get the runtime through their environment, and the line names it
    assert env["EMBEDQ_RUNTIME"] == "openvino"
    assert "runtime openvino" in line


def test_an_unknown_runtime_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from producer.cli.main import build_parser

    # given a runtime embedq does not have, when the flags are parsed, then it stops with exit 2 naming the choices
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["embed", "in.jsonl", "-o", "out.npy", "--runtime", "tensorrt"])
    assert stopped.value.code == 2
    assert "onnxruntime" in capsys.readouterr().err


def test_the_attention_scale_is_folded_into_the_query_weights_only_where_the_output_stays_the_same(
    tiny_bert: Path,
) -> None:
    import torch

    from workers.encoder.convert import export_wrapper, fold_attention_scale

    # given the tiny BERT's export wrapper (the scale is folded as it is built) and the unfolded model
    from workers.encoder.torch_backend import load_module

    info = resolve_model(str(tiny_bert))
    wrapper, example = export_wrapper(info, uses_token_types=False)
    plain = load_module(info)
    # then every self-attention's scaling is 1 and the hidden states are the unfolded model's
    scalings = [sub.scaling for sub in wrapper.modules() if hasattr(sub, "query")]
    assert scalings and set(scalings) == {1.0}
    with torch.inference_mode():
        np.testing.assert_allclose(
            wrapper(**example).numpy(), plain(**example).last_hidden_state.numpy(), rtol=1e-4, atol=1e-5
        )

    # given an attention module with a `scaling` its forward does not use the way BERT's does
    class OddAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = torch.nn.Linear(4, 4)
            self.scaling = 0.5

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.query(x) * 0.5

    odd = OddAttention()
    weight = odd.query.weight.detach().clone()
    # when folding is tried on it, then the check sees a different output and restores it as it was
    assert fold_attention_scale(odd, {"x": torch.ones(2, 4)}) == 0
    assert odd.scaling == 0.5 and torch.equal(odd.query.weight, weight)
