"""A web request's own task options: the prompt it resolves to, the dimensions it keeps, its long-text policy.

Both clients and the gateway call this before anything is sent, so that an unknown prompt name, too
many dimensions or a long-text policy it cannot get is one clear error (a ConfigError, HTTP 400)
rather than a failed chunk. The options become part of the request's cache keys
(producer/serve/cache.py), and the worker acts on them (workers/encoder/prompting.py, windows.py).
"""

from __future__ import annotations

from typing import Any

from workers.protocol.dimensions import check_dimensions
from workers.protocol.long_docs import TRUNCATE, check_request_long
from workers.protocol.model_info import ModelInfo
from workers.protocol.prompts import UnknownPrompt, resolve_prompt


def request_options(
    model: ModelInfo,
    width: int,
    prompt_name: str | None,
    prompt: str | None,
    dimensions: int | None,
    long: str = TRUNCATE,
) -> dict[str, Any]:
    """`{"prompt": text, "dimensions": n, "long": policy}`, each only when it changes anything; `width` 0 is
    "not known yet".

    UnknownPrompt, DimensionsUnsupported or LongPolicyUnsupported (all ConfigError).
    """
    extra: dict[str, Any] = {}
    if model.pooling:  # described (folder or fleet): its prompts are known, the default included
        text = resolve_prompt(model, prompt_name, prompt)
        # Sent only when it says something, so that the cache keys of requests without prompts stay as they were.
        if text or model.default_prompt_name is not None:
            extra["prompt"] = text
    elif prompt_name is not None:
        raise UnknownPrompt(
            f"prompt name {prompt_name!r}: the prompts of model {model.name} are not known here "
            "(no folder to read and no worker has announced it); pass the prompt text instead"
        )
    elif prompt is not None:
        extra["prompt"] = resolve_prompt(model, None, prompt)
    cut = check_dimensions(dimensions, width, model.name)
    if cut is not None and cut != width:
        extra["dimensions"] = cut
    check_request_long(long, extra.get("prompt"))
    if long != TRUNCATE:  # only then, so that the cache keys of truncating requests stay as they were
        extra["long"] = long
    return extra
