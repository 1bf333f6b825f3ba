"""Start (or join) Ray and run the training job on a TorchTrainer of DeepSpeed workers."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from dist_minbert.config import RunConfig
from dist_minbert.config_loader import to_plain
from launch.worker import threads_for, train_worker

log = logging.getLogger(__name__)


def connect(address: str, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` or RAY_ADDRESS; otherwise start a local instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        # "local": always a new instance of our own, never a stray `ray start` cluster found on the machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False)


def run_training(cfg: RunConfig) -> dict:
    """Fit on Ray Train; returns the run's summary.json (written by rank 0)."""
    from ray.train import CheckpointConfig as RayCheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    connect(cfg.workers.address)
    out = Path(cfg.train.output_dir)
    threads = threads_for(cfg.workers.cpus_per_worker, cfg.workers.threads_per_worker)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_plain(cfg)},
        torch_config=TorchConfig(backend="nccl" if cfg.workers.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers.num_workers, use_gpu=cfg.workers.use_gpu,
                                     resources_per_worker={"CPU": cfg.workers.cpus_per_worker}),
        run_config=RayRunConfig(
            # One Ray run per launch: Ray Train would otherwise restore an earlier launch's reported checkpoints
            # into this one; continuing a run is what `--resume` says, restarts within a launch are Ray's.
            name=f"ray_train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", storage_path=str(out),
            failure_config=FailureConfig(max_failures=cfg.workers.max_failures),
            checkpoint_config=RayCheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}}),
    )
    started = time.perf_counter()
    trainer.fit()
    summary = json.loads((out / "summary.json").read_text())
    summary["job_wall_s"] = time.perf_counter() - started  # the whole job as the user waits for it
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
