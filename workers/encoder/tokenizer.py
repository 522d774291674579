"""Text to token ids: the model's tokenizer.json run by the `tokenizers` library, or transformers' tokenizer.

transformers imports torch (2 s here), which a pool child running OpenVINO or ONNX Runtime otherwise
never needs. The `tokenizers` library is what transformers' fast tokenizers call underneath, so for
a model with a tokenizer.json it gives the same ids without transformers. "The same" is checked, not
assumed: once per model (a conversion-cache entry, workers/encoder/convert.py) transformers' tokenizer
and the file tokenizer encode a set of probe texts, with and without truncation and special tokens;
the file tokenizer is used only where every id and every truncation flag agreed. Otherwise, and for a
slow (Python) tokenizer, transformers' tokenizer is used, as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import tokenizers

from workers.encoder.convert import converted, model_folder
from workers.protocol.errors import ModelError
from workers.protocol.model_info import ModelInfo

log = logging.getLogger(__name__)

_META = "tokenizer-meta.json"
_FILE = "tokenizer.json"
#: Bumped when the probe texts or the check change, so that earlier verdicts are not reused.
PROBE_VERSION = 1
#: Texts both tokenizers must encode alike: scripts, accents, case, emoji, controls, special-token text,
#: whitespace, numbers, and (built in `_probes`) texts longer than any max_length, to compare truncation.
PROBE_TEXTS = (
    "",
    " ",
    "a",
    "Hello, World!",
    "  leading and trailing spaces  ",
    "Tabs\tand\nnewlines\r\nhere",
    "Ünïcödé àccents: café, naïve, Ångström, straße",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "emoji 🙂🚀 and symbols © ® ™ ∑ ∞ → ≠",
    "[CLS] [SEP] [PAD] [MASK] [UNK] <s> </s> <pad> <mask>",
    "numbers 3.14159 1,000,000 2026-12-03 0x1F",
    "URL https://example.com/path?q=1&r=2#frag and e-mail a.b@example.org",
    "ALL CAPS and MiXeD CaSe and snake_case and camelCase",
    "\u200b zero\u00a0width and non-breaking spaces \u2028",
    "Ｆｕｌｌｗｉｄｔｈ letters and ﬁ ligatures",
    "don't won't it's y'all'd've",
)


class Tokenizer(Protocol):
    """What the encoder needs of a tokenizer. Not thread-safe: callers hold the encoder's tokenizer lock."""

    pad_id: int
    special_ids: frozenset[int]
    #: The model takes token_type_ids (BERT does; RoBERTa does not).
    uses_token_types: bool

    def encode(
        self, texts: Sequence[str], max_length: int | None = None, special: bool = True
    ) -> tuple[list[list[int]], list[bool]]:
        """Ids per text (truncated to `max_length` when given, with the special tokens unless `special` is False)
        and, per text, whether truncation cut it."""
        ...


class TransformersTokenizer:
    """transformers' AutoTokenizer for the model (imports transformers, hence torch)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.pad_id = int(getattr(tokenizer, "pad_token_id", None) or 0)
        self.special_ids = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", ()))
        self.uses_token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
        self.is_fast = bool(getattr(tokenizer, "is_fast", False))

    @classmethod
    def load(cls, info: ModelInfo) -> TransformersTokenizer:
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(info.path, local_files_only=info.is_local))
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"model {info.path!r}: cannot load ({first_line})") from error

    def encode(
        self, texts: Sequence[str], max_length: int | None = None, special: bool = True
    ) -> tuple[list[list[int]], list[bool]]:
        encoded = self.tokenizer(
            list(texts),
            truncation=max_length is not None,
            max_length=max_length,
            add_special_tokens=special,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,  # no "longer than the maximum" warning: windows ask for long texts on purpose
        )
        ids: list[list[int]] = encoded["input_ids"]
        if max_length is None:
            return ids, [False] * len(ids)
        if getattr(encoded, "encodings", None):
            return ids, [bool(enc.overflowing) for enc in encoded.encodings]
        # Slow tokenizers keep no overflow record: count by the truncated length.
        return ids, [len(row) >= max_length for row in ids]


class FileTokenizer:
    """The model's tokenizer.json run by the `tokenizers` library; no transformers, no torch."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()
        self.pad_id = int(meta["pad_id"])
        self.special_ids = frozenset(int(i) for i in meta["special_ids"])
        self.uses_token_types = bool(meta["uses_token_types"])

    def encode(
        self, texts: Sequence[str], max_length: int | None = None, special: bool = True
    ) -> tuple[list[list[int]], list[bool]]:
        # As transformers sets it on every call: right-side, longest-first, no stride.
        if max_length is None:
            self._tokenizer.no_truncation()
        else:
            self._tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=special)
        return [enc.ids for enc in encodings], [bool(enc.overflowing) for enc in encodings]


def _probes() -> list[str]:
    long_text = " ".join(f"word{n} café 中文 🙂" for n in range(400))
    return [*PROBE_TEXTS, long_text, "x" * 3000, " ".join(PROBE_TEXTS) * 8]


def _agree(file_tokenizer: FileTokenizer, reference: TransformersTokenizer) -> str:
    """'' when both encode every probe alike, else what differed first."""
    probes = _probes()
    for max_length in (None, 8, 128, 512):
        for special in (True, False):
            for text in probes:
                mine = file_tokenizer.encode([text], max_length, special)
                theirs = reference.encode([text], max_length, special)
                if mine != theirs:
                    return f"{text[:40]!r} (max_length {max_length}, special tokens {special})"
    return ""


def _write_meta(info: ModelInfo) -> Any:
    def build(folder: Path) -> None:
        reference = TransformersTokenizer.load(info)
        meta: dict[str, Any] = {
            "pad_id": reference.pad_id,
            "special_ids": sorted(reference.special_ids),
            "uses_token_types": reference.uses_token_types,
            "file_tokenizer": False,
        }
        path = model_folder(info) / _FILE
        if not reference.is_fast:
            meta["why_not"] = "transformers loads a slow (Python) tokenizer for this model"
        elif not path.is_file():
            meta["why_not"] = f"the model has no {_FILE}"
        else:
            differs = _agree(FileTokenizer(path, meta), reference)
            meta["file_tokenizer"] = not differs
            if differs:
                meta["why_not"] = f"{_FILE} encodes a probe text differently: {differs}"
        (folder / _META).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    return build


def load_tokenizer(info: ModelInfo, cache_dir: str = "") -> Tokenizer:
    """The file tokenizer where it was checked to agree with transformers' for this model, else transformers'."""
    try:
        entry = converted(
            info, "tokenizer", metadata.version("tokenizers"), {"probes": PROBE_VERSION}, _write_meta(info), cache_dir
        )
    except ModelError as error:  # no local folder to read the files from: transformers says why, or copes
        log.info("%s; using transformers' tokenizer", error)
        return TransformersTokenizer.load(info)
    meta = json.loads((entry / _META).read_text(encoding="utf-8"))
    if meta["file_tokenizer"]:
        return FileTokenizer(model_folder(info) / _FILE, meta)
    log.info("model %s: %s; using transformers' tokenizer", info.name, meta.get("why_not", ""))
    return TransformersTokenizer.load(info)
