"""The tokenizer without transformers: transformers' ids or not used; a child that never imports torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from workers.encoder.tokenizer import FileTokenizer, TransformersTokenizer, load_tokenizer
from workers.protocol.model_info import default_model_path, resolve_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "producer" / "samples" / "sample.jsonl"


def _sample_texts() -> list[str]:
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"].strip() for line in lines if line.strip()]


def test_the_file_tokenizer_gives_transformers_ids_and_truncation_flags_on_the_sample(tmp_path: Path) -> None:
    # given the packaged model's tokenizer, as a worker loads it, and transformers' own
    info = resolve_model("")
    chosen = load_tokenizer(info, str(tmp_path / "cache"))
    reference = TransformersTokenizer.load(info)
    texts = _sample_texts()
    # then the file tokenizer was chosen, and it encodes every sample text exactly alike, at every limit
    assert isinstance(chosen, FileTokenizer)
    for max_length in (None, 16, 256):
        for special in (True, False):
            assert chosen.encode(texts, max_length, special) == reference.encode(texts, max_length, special)
    # and some texts were truncated at 16 tokens, so the flags were compared where they say something
    assert 0 < sum(chosen.encode(texts, 16)[1]) < len(texts)
    assert (chosen.pad_id, chosen.special_ids, chosen.uses_token_types) == (
        reference.pad_id,
        reference.special_ids,
        reference.uses_token_types,
    )


def test_a_tokenizer_json_that_transformers_reads_differently_is_not_used(tmp_path: Path) -> None:
    # given a model whose tokenizer_config.json says cased while its tokenizer.json lowercases
    source = default_model_path()
    model = tmp_path / "cased"
    model.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "special_tokens_map.json", "config.json"):
        shutil.copy(source / name, model / name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    # when its tokenizer is loaded
    info = resolve_model(str(model))
    chosen = load_tokenizer(info, str(tmp_path / "cache"))
    # then the probe check saw the difference: transformers' tokenizer is used, with its (cased) ids
    assert isinstance(chosen, TransformersTokenizer)
    assert chosen.encode(["Hello World"]) == TransformersTokenizer.load(info).encode(["Hello World"])
    (meta,) = (tmp_path / "cache").glob("tokenizer-*/tokenizer-meta.json")
    assert "encodes a probe text differently" in json.loads(meta.read_text())["why_not"]


def test_an_openvino_encoder_with_its_model_converted_never_imports_torch(tiny_bert: Path, tmp_path: Path) -> None:
    # given the tiny model converted for OpenVINO once (this process has torch: it converts)
    from workers.encoder import Encoder

    cache = str(tmp_path / "cache")
    texts = ["a short sentence", "another, longer sentence about the weather in spring", ""]
    Encoder.load(resolve_model(str(tiny_bert)), "cpu", runtime="openvino", cache_dir=cache)
    reference = Encoder.load(resolve_model(str(tiny_bert)), "cpu").encode(texts).embeddings
    # when a fresh interpreter (as a spawned pool child) loads and encodes with it
    code = (
        "import json, sys\n"
        "from workers.encoder import Encoder\n"
        "from workers.protocol.model_info import resolve_model\n"
        f"encoder = Encoder.load(resolve_model({str(tiny_bert)!r}), 'auto', runtime='openvino', cache_dir={cache!r})\n"
        f"rows = encoder.encode({texts!r}).embeddings.tolist()\n"
        "print(json.dumps({'rows': rows, 'torch': 'torch' in sys.modules, "
        "'transformers': 'transformers' in sys.modules, 'tokenizer': type(encoder.tokenizer).__name__}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # then neither torch nor transformers was imported, and the rows are torch's
    assert (result["torch"], result["transformers"], result["tokenizer"]) == (False, False, "FileTokenizer")
    np.testing.assert_allclose(np.array(result["rows"], dtype=np.float32), reference, atol=1e-5)
