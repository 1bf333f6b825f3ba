"""SurgeryConfig: defaults, and errors that name the key when the config loads."""

from __future__ import annotations

import sys

import pytest

from dist_minbert.config import load_config
from dist_minbert.config_loader import ConfigError
from dist_minbert.surgery.config import SurgeryConfig


def test_defaults_are_the_baseline() -> None:
    config = SurgeryConfig()
    assert (config.mode, config.weighting, config.plan) == ("sum", "pcgrad", "auto")


@pytest.mark.parametrize("override, allowed", [
    ("surgery.mode=pcgrad_global", "'sum', 'pcgrad_local', 'pcgrad'"),
    ("surgery.weighting=cagrad", "'pcgrad', 'upgrad', 'mgda'"),
    ("surgery.plan=ring", "'auto', 'allreduce', 'sharded'"),
])
def test_unknown_names_are_rejected_by_the_loader(override: str, allowed: str) -> None:
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError, match=f"^{key}: '{value}' is not allowed; allowed: {allowed}$"):
        load_config(None, [override])


def test_a_weighting_that_cannot_run_stops_the_load_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchjd", None)  # makes `import torchjd` raise ImportError
    with pytest.raises(ConfigError, match=r"^surgery\.weighting: 'mgda' cannot run here: .*pip install torchjd"):
        load_config(None, ["surgery.mode=pcgrad", "surgery.weighting=mgda"])
    # The weighting is not used without surgery, so it is not needed then.
    assert load_config(None, ["surgery.weighting=mgda"]).surgery.weighting == "mgda"


def test_a_weighting_unknown_to_the_registry_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"^weighting: 'cagrad' is unknown; allowed: sum, pcgrad, upgrad, mgda$"):
        SurgeryConfig(mode="pcgrad_local", weighting="cagrad")  # type: ignore[arg-type]
