"""Start (or join) Ray and run jobs on Ray Train workers: the one place a TorchTrainer is built."""
from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Callable

from dist_minbert.config import RunConfig, SimCSERunConfig
from dist_minbert.config_loader import to_plain
from launch import output
from launch.config import WorkersConfig
from launch.worker import run_worker, simcse_worker, threads_for, train_worker


def connect(address: str, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` or RAY_ADDRESS; otherwise start a local instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, **output.ray_init_options(local=False))
    else:
        # "local": always a new instance of our own, never a stray `ray start` cluster found on the machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **output.ray_init_options(local=True))


def fit_on_workers(worker_fn: Callable[[dict], None], loop_config: dict, workers: WorkersConfig, storage_path: str,
                   name: str, num_checkpoints_to_keep: int | None = None) -> None:
    """`worker_fn(loop_config)` on `workers.num_workers` Ray Train workers; returns when all have finished.

    Ray Train restarts the group up to `workers.max_failures` times; `name` is the run's folder under
    `storage_path`, where Ray keeps the reported checkpoints (the newest `num_checkpoints_to_keep`, or all).
    A URL `storage_path` reaches Ray through fsspec's filesystem, with this process's fsspec settings for it
    (endpoint, keys), which the workers receive as FSSPEC_<PROTOCOL> in their environment.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dist_minbert.engine.run_storage import arrow_filesystem, fsspec_env, is_url

    connect(workers.address)
    threads = threads_for(workers.cpus_per_worker, workers.threads_per_worker)
    # OpenMP reads its thread count once, at process start: the environment is the only place to set it.
    env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", **output.worker_env(workers.use_gpu),
           **fsspec_env(storage_path)}
    storage_filesystem = None
    if is_url(storage_path):
        storage_path, storage_filesystem = arrow_filesystem(storage_path)
    TorchTrainer(
        functools.partial(run_worker, worker_fn, threads),
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if workers.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.use_gpu,
                                     resources_per_worker={"CPU": workers.cpus_per_worker}),
        run_config=RayRunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=workers.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_checkpoints_to_keep),
            worker_runtime_env={"env_vars": env}, logging_config=output.train_logging_config()),
    ).fit()


def check_inputs(cfg: RunConfig | SimCSERunConfig) -> None:
    """The files a run starts from, checked before Ray starts: missing, they would fail every worker instead,
    as a Ray error. Raises FileNotFoundError; a model checkpoint behind a URL is left to the workers, a resume
    point at one is looked up (the URL's `latest` pointer)."""
    from dist_minbert.engine.run_storage import RunStorage
    from dist_minbert.model.checkpoint import EMBEDDED

    model = cfg.model.checkpoint
    if model != EMBEDDED and "://" not in model and not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"model.checkpoint: {model} is not a checkpoint folder (no config.json there); "
                                f"allowed: a Hugging Face BERT folder, an fsspec URL, or {EMBEDDED!r}")
    RunStorage(cfg.train.output_dir, cfg.train.local_dir).resume_source(cfg.checkpoint.resume)


def run_training(cfg: RunConfig) -> dict:
    """Fit on Ray Train; returns the run's summary.json (written by rank 0)."""
    return _run_job(train_worker, cfg)


def run_simcse(cfg: SimCSERunConfig) -> dict:
    """SimCSE on Ray Train; returns the run's summary.json (written by rank 0)."""
    return _run_job(simcse_worker, cfg)


def _run_job(worker_fn: Callable[[dict], None], cfg: RunConfig | SimCSERunConfig) -> dict:
    from dist_minbert.model.folder import Folder

    check_inputs(cfg)
    out = Folder(cfg.train.output_dir)  # a local folder or a URL
    started = time.perf_counter()
    # One Ray run per launch: Ray Train would otherwise restore an earlier launch's reported checkpoints
    # into this one; continuing a run is what `--resume` says, restarts within a launch are Ray's.
    fit_on_workers(worker_fn, {"config": to_plain(cfg)}, cfg.workers, cfg.train.output_dir,
                   name=f"ray_train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                   num_checkpoints_to_keep=cfg.checkpoint.keep_last)
    summary = json.loads(out.read_text("summary.json"))
    summary["job_wall_s"] = time.perf_counter() - started  # the whole job as the user waits for it
    out.write_text("summary.json", json.dumps(summary, indent=2))
    return summary
