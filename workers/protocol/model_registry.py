"""The models the fleet serves, as workers announce them: how a light install describes a model.

A producer needs a model's width, pooling, length limit and prompts before it sends a chunk (the output file
is laid out by width). It reads them from the model's folder when it has one; a light install
(`pip install embedq`, no worker extra) has neither the packaged default nor the hub client, so it
asks the fleet instead: each pool child records its model in the `Keys.models()` hash as it loads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import cast

import redis

from workers.protocol.config import Settings
from workers.protocol.errors import ConfigError, ModelNotInstalled
from workers.protocol.keys import Keys, connect, redact
from workers.protocol.model_info import DEFAULT_MODEL_NAME, ModelInfo, model_identity, resolve_model


def encode(model: ModelInfo) -> str:
    """The JSON a worker announces for its model."""
    return json.dumps(dataclasses.asdict(model), sort_keys=True)


def decode(raw: bytes | str) -> ModelInfo:
    """The model as announced, named but not local: its folder is on the worker's machine."""
    data = json.loads(raw)
    # Prompts arrived later: an announcement from an older worker has none (and includes them when pooling).
    prompts = {str(k): str(v) for k, v in (data.get("prompts") or {}).items()}
    default = data.get("default_prompt_name")
    return ModelInfo(
        str(data["name"]),
        str(data["name"]),
        False,
        str(data["pooling"]),
        int(data["max_length"]),
        int(data["dim"]),
        prompts,
        str(default) if default is not None and str(default) in prompts else None,
        bool(data.get("include_prompt", True)),
    )


def announce(pipe: redis.client.Pipeline, keys: Keys, model: ModelInfo) -> None:
    """Queue the announcement of `model` on `pipe` (a worker does it with its other start-up counters)."""
    pipe.hset(keys.models(), model.name, encode(model))


def lookup(client: redis.Redis, keys: Keys, name: str) -> ModelInfo | None:
    """The model `name` ("" for the default) as a worker announced it, or None."""
    raw = cast(bytes | None, client.hget(keys.models(), name or DEFAULT_MODEL_NAME))
    return decode(raw) if raw is not None else None


def describe(
    settings: Settings, *, pooling: str = "auto", max_length: int | None = None, prefer_fleet: bool = False
) -> ModelInfo:
    """`resolve_model(settings.model)`, or where this install cannot read the model, what the fleet
    behind `settings.broker_url` announced for it (BrokerUnavailable when that broker is not there).

    `prefer_fleet` (a producer on a running fleet): a name that is not a local folder is first looked up
    among the announced models, so that a model the fleet serves is named as `/v1/models` lists it, with
    no hub lookup.
    """
    found = None
    if prefer_fleet and settings.model and not Path(settings.model).expanduser().is_dir():
        found = _announced(settings, model_identity(settings.model))
    if found is None:
        try:
            return resolve_model(settings.model, pooling=pooling, max_length=max_length)
        except ModelNotInstalled as error:
            found = _announced(settings, settings.model)
            if found is None:
                raise ModelNotInstalled(
                    f"{error}; or start a worker for it first (none at {redact(settings.broker_url)} has announced "
                    "it yet)"
                ) from None
    if max_length is not None and not 2 <= max_length <= found.max_length:
        raise ConfigError(
            f"--max-length {max_length}: the fleet's {found.name} takes 2 to {found.max_length} here "
            "(without the model's files this install cannot read its positions)"
        )
    return dataclasses.replace(
        found, pooling=found.pooling if pooling == "auto" else pooling, max_length=max_length or found.max_length
    )


def _announced(settings: Settings, name: str) -> ModelInfo | None:
    client = connect(settings.broker_url)
    try:
        return lookup(client, Keys(settings.key_prefix), name)
    finally:
        client.close()
