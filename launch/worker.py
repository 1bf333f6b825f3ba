"""The function each Ray Train worker runs: typed config on the first line, then the plain trainer.

Checkpoints reach Ray Train as pointers: the trainer writes them (atomically) into the run's own
checkpoints/ folder on storage every worker shares (or at train.output_dir's URL), and rank 0 reports a
one-file checkpoint that names that folder, so Ray copies a few bytes instead of the model and optimizer.
After a worker dies, Ray Train restarts the group (FailureConfig), and the restarted workers continue from
the run's newest complete checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from launch.output import configure_worker_logging, is_verbose

log = logging.getLogger(__name__)

POINTER = "dist_minbert_checkpoint.json"  # the file of a reported checkpoint: {"path": <checkpoint folder or URL>}
STARTED = "dist_minbert_started"  # in this launch's Ray folder: the workers have started once


def threads_for(cpus_per_worker: float, threads_per_worker: int) -> int:
    """Intra-op threads: as configured, else the CPUs Ray reserved for the worker, so workers never oversubscribe."""
    return threads_per_worker or max(1, int(cpus_per_worker))


def run_worker(worker_fn: Callable[[dict], None], threads: int, loop_config: dict) -> None:
    """Every job's worker entry: torch threads as the launcher reserved, our log lines only unless verbose."""
    torch.set_num_threads(threads)
    configure_worker_logging()
    with contextlib.ExitStack() as stack:
        if not is_verbose():
            # Our lines are log records; what libraries print (DeepSpeed's "… built successfully") is not ours.
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        worker_fn(loop_config)


def train_worker(loop_config: dict) -> None:
    from dist_minbert.config import config_from_dict
    from dist_minbert.engine.trainer import Trainer

    _fit(Trainer, config_from_dict(loop_config["config"]))


def simcse_worker(loop_config: dict) -> None:
    from dist_minbert.config import simcse_config_from_dict
    from dist_minbert.engine.simcse_trainer import SimCSETrainer

    _fit(SimCSETrainer, simcse_config_from_dict(loop_config["config"]))


def _fit(job, cfg) -> None:
    """Any job on the engine: resume point and device from Ray, then the plain loop."""
    from dist_minbert.engine.dist_context import DistContext

    cfg.checkpoint.resume = _resume_point(cfg)
    if cfg.workers.use_gpu:
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    job(cfg, DistContext.current(cfg.workers.use_gpu), report=_report_to_ray).fit()


def _resume_point(cfg) -> str:
    """`checkpoint.resume` on the first start; "latest" when Ray Train restarted the workers after a failure
    and the run has written a checkpoint since.

    Not `ray.train.get_checkpoint()`: Ray's controller collects reports by polling (every 2 s), so the last
    checkpoint a dying worker reported can be missing there, and a restart would redo steps or start over;
    the run's own `latest` pointer is never older. A marker in this launch's Ray folder tells a restart from
    the first start; rank 0 decides for every rank.
    """
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    from dist_minbert.engine.checkpointing import LATEST
    from dist_minbert.engine.run_storage import RunStorage

    context = ray.train.get_context()
    resume = None
    if context.get_world_rank() == 0:
        storage = RunStorage(cfg.train.output_dir, cfg.train.local_dir)  # Ray's run folder is in it, local or URL
        marker = f"{context.get_experiment_name()}/{STARTED}"
        restarted = storage.exists(marker)
        storage.touch(marker)
        resume = LATEST if restarted and storage.has_checkpoint() else cfg.checkpoint.resume
        if restarted:
            log.warning("restarted after a failure; resuming from %s", resume or "the start")
    return broadcast_from_rank_zero(resume)


def _report_to_ray(metrics: dict, checkpoint_folder: str) -> None:
    """Every rank reports (Ray Train's report is a barrier); rank 0 attaches the pointer checkpoint."""
    import ray.train

    flat = {k: metrics[k] for k in ("epoch", "step", "score") if k in metrics}
    flat.update({f"dev/{t}/{m}": v for t, ms in metrics.get("dev", {}).items() for m, v in ms.items()})
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(flat)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = checkpoint_folder if "://" in checkpoint_folder else str(Path(checkpoint_folder).resolve())
        (Path(folder) / POINTER).write_text(json.dumps({"path": path}))
        ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(folder))
