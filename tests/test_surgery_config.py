"""SurgeryConfig: defaults, and errors that name the field and the allowed values."""

from __future__ import annotations

import pytest

from dist_minbert.surgery.config import SurgeryConfig


def test_defaults_are_the_baseline() -> None:
    config = SurgeryConfig()
    assert (config.mode, config.weighting, config.plan) == ("sum", "pcgrad", "auto")


@pytest.mark.parametrize("field, value, allowed", [
    ("mode", "pcgrad_global", "sum, pcgrad_local, pcgrad"),
    ("weighting", "cagrad", "pcgrad, upgrad, mgda"),
    ("plan", "ring", "auto, allreduce, sharded"),
])
def test_unknown_values_are_rejected(field: str, value: str, allowed: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: '{value}' is unknown; allowed: {allowed}$"):
        SurgeryConfig(**{field: value})
