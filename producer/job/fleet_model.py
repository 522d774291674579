"""Which model a corpus job asks for, checked against the fleet before anything is sent.

On a running fleet (`--broker`), a model that no live worker serves while others are served is refused
at once, naming the served ones (exit 2), unless `--wait-for-workers` gives its workers time to come;
a model the fleet serves may be named as `/v1/models` lists it, even where this install cannot read it.
"""

from __future__ import annotations

from workers.protocol.config import Settings
from workers.protocol.keys import Keys, connect, redact
from workers.protocol.model_info import ModelInfo, model_identity
from workers.protocol.model_registry import describe
from workers.protocol.queues import BULK
from workers.protocol.served import wait_until_served


def job_model(
    settings: Settings,
    *,
    on_fleet: bool,
    check_served: bool,
    wait_s: float = 0.0,
    pooling: str = "auto",
    max_length: int | None = None,
) -> ModelInfo:
    """The job's model, described from its folder or as the fleet announced it; ModelNotServed (a ConfigError)
    when `check_served` and live workers on `settings.broker_url` serve only other models."""
    if on_fleet and check_served:
        client = connect(settings.broker_url)  # BrokerUnavailable (exit 4) at once when it is not there
        try:
            where = f" on {redact(settings.broker_url)}"
            wait_until_served(
                client, Keys(settings.key_prefix), model_identity(settings.model), BULK, wait_s=wait_s, where=where
            )
        finally:
            client.close()
    return describe(settings, pooling=pooling, max_length=max_length, prefer_fleet=on_fleet)
