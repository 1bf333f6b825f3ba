"""DataConfig / ScheduleConfig reject bad values with the field name first."""

from __future__ import annotations

import pytest

from dist_minbert.config import load_config
from dist_minbert.config_loader import ConfigError
from dist_minbert.data.config import DataConfig, ScheduleConfig


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"prefetch": -1}, "prefetch"),
        ({"shuffle_block_rows": 0}, "shuffle_block_rows"),
    ],
)
def test_data_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: .*allowed: "):
        DataConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"steps_per_epoch": 10, "steps_per_epoch_fraction": 0.5}, "steps_per_epoch"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"steps_per_epoch_fraction": 0.0}, "steps_per_epoch_fraction"),
        ({"tasks_per_step": 0}, "tasks_per_step"),
        ({"anneal_decay": 1.5}, "anneal_decay"),
        ({"temperature": 0.0}, "temperature"),
        ({"name": "staggered", "stagger_tasks": []}, "stagger_tasks"),
        ({"stagger_epochs": -1}, "stagger_epochs"),
        ({"batch_multiple": 0}, "batch_multiple"),
    ],
)
def test_schedule_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: .*allowed: "):
        ScheduleConfig(**kwargs)


@pytest.mark.parametrize("override", ["data.on_bad_row=drop", "data.prepare_engine=spark", "schedule.name=random"])
def test_names_outside_their_literal_are_rejected_by_the_loader(override):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError, match=rf"^{key}: '{value}' is not allowed; allowed: "):
        load_config(None, [override])
