"""Sentence-transformers prompts: what a model folder declares, and which prompt a request gets.

A folder saved by sentence-transformers may name prompts in `config_sentence_transformers.json`
(`{"prompts": {"query": "query: ", ...}, "default_prompt_name": "query"}`), and its Pooling module may
say `include_prompt: false` (the prompt's tokens are then left out of the pooled vector, as INSTRUCTOR
and similar models expect). embedq resolves a request's prompt exactly as `SentenceTransformer.encode`
does (`_resolve_prompt`): an explicit `prompt` wins, else `prompt_name`, else the folder's default, else
none. The producer resolves the name (so that an unknown one fails at once, before anything is sent)
and sends the prompt's text; the worker prepends it and measures its length as sentence-transformers
does (workers/encoder/prompting.py). Read without torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from workers.protocol.errors import ConfigError, ModelError

ST_CONFIG = "config_sentence_transformers.json"


class HasPrompts(Protocol):
    """What prompt resolution needs of a model (`ModelInfo` has it; model_info imports this module)."""

    @property
    def name(self) -> str: ...

    @property
    def prompts(self) -> Mapping[str, str]: ...

    @property
    def default_prompt_name(self) -> str | None: ...


class UnknownPrompt(ConfigError):
    """Raised when a request names a prompt that the model folder does not declare."""


def read_prompts(folder: Path) -> tuple[dict[str, str], str | None]:
    """(prompts, default_prompt_name) declared by a sentence-transformers folder; ({}, None) without one.

    As sentence-transformers loads them: a null prompt reads as "", and a default naming no prompt is an error.
    """
    path = folder / ST_CONFIG
    if not path.is_file():
        return {}, None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: cannot read model file ({error})") from error
    raw = config.get("prompts") if isinstance(config, dict) else None
    prompts = {str(name): "" if text is None else str(text) for name, text in (raw or {}).items()}
    default = config.get("default_prompt_name") if isinstance(config, dict) else None
    if default is not None and default not in prompts:
        raise ModelError(f"{path}: default_prompt_name {default!r} is not one of its prompts {sorted(prompts)}")
    return prompts, default


def resolve_prompt(model: HasPrompts, prompt_name: str | None = None, prompt: str | None = None) -> str:
    """The prompt text a request gets ("" for none), as sentence-transformers' `encode` resolves it.

    An explicit `prompt` (even "") wins; passing both is refused rather than guessed at; an unknown
    name raises UnknownPrompt listing the names the folder declares.
    """
    if prompt is not None and prompt_name is not None:
        raise ConfigError("pass a prompt name or a prompt text, not both")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a string, got {type(prompt).__name__}")
        return prompt
    if prompt_name is not None:
        if not isinstance(prompt_name, str) or prompt_name not in model.prompts:
            names = ", ".join(sorted(model.prompts)) or "none"
            raise UnknownPrompt(f"prompt name {prompt_name!r}: model {model.name} declares these prompts: {names}")
        return model.prompts[prompt_name]
    if model.default_prompt_name is not None:
        return model.prompts.get(model.default_prompt_name, "")
    return ""


def prompt_label(model: HasPrompts, prompt_name: str | None, prompt: str | None) -> str | None:
    """The prompt's name as a manifest records it: the one asked for, else the default that applied."""
    if prompt is not None:
        return None
    return prompt_name if prompt_name is not None else model.default_prompt_name
