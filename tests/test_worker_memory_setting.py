"""EMBEDQ_MAX_CHILD_MEMORY_MB: the safety net that recycles a pool child grown past a size."""

from __future__ import annotations

import pytest

from workers.protocol.config import Settings, celery_config
from workers.protocol.errors import ConfigError


def test_max_child_memory_reaches_celery_in_kib() -> None:
    # given the setting in MB, as a user writes it
    settings = Settings.from_env({"EMBEDQ_MAX_CHILD_MEMORY_MB": "2048"})
    # when the Celery configuration is built, then Celery gets KiB
    assert celery_config(settings)["worker_max_memory_per_child"] == 2048 * 1024


@pytest.mark.parametrize("raw", ["0", ""])
def test_max_child_memory_zero_or_empty_turns_the_check_off(raw: str) -> None:
    # given the setting switched off, then Celery never recycles a child for its size
    assert celery_config(Settings.from_env({"EMBEDQ_MAX_CHILD_MEMORY_MB": raw}))["worker_max_memory_per_child"] is None


def test_default_max_child_memory_is_on_and_survives_to_env() -> None:
    # given default settings, then the net is on, and spawned children rebuild the same value from the environment
    settings = Settings()
    assert settings.max_child_memory_mb
    assert Settings.from_env(settings.to_env()).max_child_memory_mb == settings.max_child_memory_mb


def test_negative_max_child_memory_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="EMBEDQ_MAX_CHILD_MEMORY_MB=-1"):
        Settings.from_env({"EMBEDQ_MAX_CHILD_MEMORY_MB": "-1"})
