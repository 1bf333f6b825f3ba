"""Which knobs a job turns down: all of them by default, none of Ray's with DIST_MINBERT_VERBOSE=1 (or --verbose).

What the user then sees is tested end to end in test_cli.py::test_train_prints_our_lines_and_none_of_rays.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dist_minbert.cli import main
from launch import output

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.mark.parametrize("value", [None, "0"])
def test_by_default_ray_logs_errors_only_and_ray_train_warnings(value, monkeypatch):
    if value is None:
        monkeypatch.delenv(output.VERBOSE_ENV, raising=False)
    else:
        monkeypatch.setenv(output.VERBOSE_ENV, value)
    options = output.ray_init_options(local=True)
    assert options["logging_level"] == logging.ERROR
    assert options["job_config"].py_logging_config.log_level == "ERROR"  # every task and actor of the job
    assert options["job_config"].runtime_env == {"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}}
    assert output.ray_init_options(local=False)["job_config"].runtime_env == {}  # a cluster's nodes can be drained
    assert output.train_logging_config().log_level == "WARNING"


def test_verbose_leaves_rays_logging_at_its_defaults(monkeypatch):
    monkeypatch.setenv(output.VERBOSE_ENV, "1")
    assert output.ray_init_options(local=True) == {"configure_logging": True, "logging_level": logging.INFO}
    assert output.train_logging_config().log_level == "INFO"
    assert output.worker_env(use_gpu=False)[output.VERBOSE_ENV] == "1"  # the workers see it too


def test_quiet_workers_let_our_info_and_everyones_warnings_through(monkeypatch):
    monkeypatch.delenv(output.VERBOSE_ENV, raising=False)
    levels = {name: logging.getLogger(name).level for name in ("", *output.OUR_LOGGERS)}
    try:
        output.configure_worker_logging()
        assert logging.getLogger("dist_minbert.engine.trainer").isEnabledFor(logging.INFO)
        assert logging.getLogger("launch.worker").isEnabledFor(logging.INFO)
        assert not logging.getLogger("torch.distributed").isEnabledFor(logging.INFO)
        assert logging.getLogger("torch.distributed").isEnabledFor(logging.WARNING)
    finally:  # this process's logging is pytest's
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_train_verbose_flag_sets_the_variable_the_launcher_reads(monkeypatch, tmp_path):
    monkeypatch.delenv(output.VERBOSE_ENV, raising=False)
    # a missing checkpoint stops the run on the driver, after the flag was read and before Ray starts
    assert main(["train", "--config", str(DEMO), "--verbose", f"model.checkpoint={tmp_path / 'none'}"]) == 2
    assert output.is_verbose()
