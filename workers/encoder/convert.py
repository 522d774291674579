"""Converting a local model folder for another runtime, once, into an on-disk cache; never a download.

The cache entry's name is a hash of what the conversion depends on: every file of the model folder
(relative name, size, mtime), the runtime and its version, torch and transformers, and the options.
Editing or replacing the model therefore misses the cache; nothing is ever overwritten in place.
Each process converts into a private temp folder and renames it into place: two pool children
converting at once both succeed, one rename wins, the other's copy is thrown away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from workers.protocol.errors import ModelError
from workers.protocol.model_info import ModelInfo

log = logging.getLogger(__name__)

#: Written last into a finished entry: a folder without it is never used.
DONE_FILE = "embedq-key.json"
#: Bumped when the export itself changes (inputs, outputs, wrapper), so old entries are not reused.
#: 2: the attention scale is folded into the query projection (fold_attention_scale).
FORMAT_VERSION = 2


def cache_root(cache_dir: str = "") -> Path:
    """EMBEDQ_CACHE_DIR, else $XDG_CACHE_HOME/embedq, else ~/.cache/embedq."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedq"


def model_folder(info: ModelInfo) -> Path:
    """The folder the model's files are in: the local folder, or a hub model's cached snapshot."""
    if info.is_local:
        return Path(info.path)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(info.path, "config.json", local_files_only=True)).parent
    except Exception as error:  # noqa: BLE001 - any miss means there is no local copy to convert from
        raise ModelError(f"model {info.path!r}: no local copy to convert from ({type(error).__name__})") from error


def cache_key(folder: Path, runtime: str, runtime_version: str, options: dict[str, Any]) -> dict[str, Any]:
    """Everything a converted model depends on, as a JSON-able dict (its hash names the cache entry).

    Versions are read from the installed packages' metadata: importing torch to ask would cost a child
    that never runs it 2 s."""
    files = sorted(
        (str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file() and not path.name.startswith(".") and (stat := path.stat())
    )
    return {
        "format": FORMAT_VERSION,
        "model": str(folder.resolve()),
        "files": files,
        "runtime": runtime,
        "runtime_version": runtime_version,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "options": options,
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def converted(
    info: ModelInfo,
    runtime: str,
    runtime_version: str,
    options: dict[str, Any],
    build: Callable[[Path], None],
    cache_dir: str = "",
) -> Path:
    """The cache folder holding `info` converted for `runtime`, built by `build(folder)` on a miss.

    `build` writes the converted files into the (temporary) folder it is given. Any failure becomes one
    ModelError line naming the model and the runtime.
    """
    key = cache_key(model_folder(info), runtime, runtime_version, options)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    root = cache_root(cache_dir)
    final = root / f"{runtime}-{digest}"
    if (final / DONE_FILE).is_file():
        return final
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    temp = root / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    temp.mkdir()
    try:
        try:
            with warnings.catch_warnings():  # tracer warnings about shapes: a wall of text, nothing to act on
                warnings.simplefilter("ignore")
                build(temp)
        except ModelError:
            raise
        except Exception as error:  # noqa: BLE001 - exporters raise anything; the user needs one line
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(
                f"model {info.name!r}: cannot be converted for EMBEDQ_RUNTIME={runtime} ({first_line}); "
                "use EMBEDQ_RUNTIME=torch"
            ) from error
        (temp / DONE_FILE).write_text(json.dumps(key, indent=1), encoding="utf-8")
        try:
            temp.rename(final)
        except OSError:
            # Another process renamed its finished copy into place first: use that one.
            if not (final / DONE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    log.warning("converted %s for %s in %.1f s into %s", info.name, runtime, time.monotonic() - started, final)
    return final


def export_wrapper(info: ModelInfo, uses_token_types: bool) -> tuple[Any, dict[str, Any]]:
    """The model as a torch module returning last_hidden_state only, and example inputs to trace it with."""
    import torch

    from workers.encoder.torch_backend import load_module

    model = load_module(info)

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
        ) -> torch.Tensor:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    # Two rows of unequal length, so that tracing sees a real padding mask.
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.long)
    example = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    if uses_token_types:
        example["token_type_ids"] = torch.zeros_like(ids)
    wrapper = LastHiddenState().eval()
    fold_attention_scale(wrapper, example)
    return wrapper, example


def fold_attention_scale(module: Any, example: dict[str, Any]) -> int:
    """Move each self-attention's 1/sqrt(head size) into its query projection's weights, in f32, before export.

    Why: OpenVINO's CPU plugin applies that scale as its own bf16 multiply on the keys, one more bf16 rounding
    than torch autocast has; on 6,000 fortunes its worst row fell to cosine 0.999879 (under the 0.9999 bar), and
    with the scale folded it is 0.999951, at the same speed. In f32 the fold changes nothing (worst row 0.9999999).
    It applies to attention modules with a `scaling` factor and a `query` Linear (BERT, RoBERTa, XLM-R in
    transformers); the module's output is checked against the unfolded one, and a model where it differs is
    restored as it was. Returns how many attention modules were folded.
    """
    import torch

    targets = [
        sub
        for sub in module.modules()
        if isinstance(getattr(sub, "scaling", None), float)
        and sub.scaling != 1.0
        and isinstance(getattr(sub, "query", None), torch.nn.Linear)
    ]
    if not targets:
        return 0
    with torch.inference_mode():
        before = module(**example)
    saved = [(sub, sub.scaling, sub.query.weight.detach().clone(), _bias(sub)) for sub in targets]
    with torch.no_grad():
        for sub in targets:
            sub.query.weight.mul_(sub.scaling)
            if sub.query.bias is not None:
                sub.query.bias.mul_(sub.scaling)
            sub.scaling = 1.0
        after = module(**example)
        if torch.allclose(before, after, rtol=1e-4, atol=1e-5):
            return len(targets)
        for sub, scaling, weight, bias in saved:  # this model's attention does not use `scaling` as BERT's does
            sub.scaling = scaling
            sub.query.weight.copy_(weight)
            if bias is not None:
                sub.query.bias.copy_(bias)
    return 0


def _bias(sub: Any) -> Any:
    return None if sub.query.bias is None else sub.query.bias.detach().clone()
