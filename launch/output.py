"""What a job prints. By default: our progress bar, our log lines (steps, dev metrics, warnings) and the summary.

Ray and DeepSpeed print dozens of lines nobody asked for: the Train controller's and workers' notes, each
report, the placement-group cleaner's retries, the accelerator guess. Each is turned down with its own
knob, not by filtering the console: our rank-0 lines reach the driver through Ray's log forwarding too.
`--verbose` or DIST_MINBERT_VERBOSE=1 leaves Ray's logging at its defaults. DeepSpeed's accelerator is
named either way: guessing always lands on the same answer.
"""
from __future__ import annotations

import logging
import os

VERBOSE_ENV = "DIST_MINBERT_VERBOSE"
OUR_LOGGERS = ("dist_minbert", "launch")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def ray_init_options(local: bool) -> dict:
    """ray.init's logging settings for this driver and every process of the job."""
    import ray
    from ray.job_config import JobConfig

    if is_verbose():
        return {"configure_logging": True, "logging_level": logging.INFO}
    job_config = JobConfig()
    # Ray's and the root logger of every task and actor, the detached placement-group cleaner included (its
    # state-API retries are warnings every second when the dashboard is off). Ray Train re-configures the
    # root logger of its workers, and configure_worker_logging lets our loggers through there.
    job_config.set_py_logging_config(ray.LoggingConfig(log_level="ERROR"))
    if local:
        # A local instance has no node that can be drained, so the watcher has nothing to watch; it would
        # only print the core worker's note about its restartable constructor arguments.
        job_config.set_runtime_env({"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}})
    return {"configure_logging": True, "logging_level": logging.ERROR, "job_config": job_config}


def train_logging_config():
    """Ray Train's own `ray.train` loggers on the controller and the workers: only warnings unless verbose."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment of each worker: the verbosity, and DeepSpeed's accelerator named instead of guessed (the
    guess warns on every CPU worker), unless the user named one."""
    accelerator = os.environ.get("DS_ACCELERATOR") or ("cuda" if use_gpu else "cpu")
    return {VERBOSE_ENV: os.environ.get(VERBOSE_ENV, ""), "DS_ACCELERATOR": accelerator}


def configure_worker_logging() -> None:
    """In a worker, after Ray Train set up its loggers: our INFO lines and everyone's warnings, not the INFO
    of the rest (Ray Train also turns `print` into INFO records of the root logger)."""
    if is_verbose():
        return
    logging.getLogger().setLevel(logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)

