"""The function each Ray Train worker runs: typed config on the first line, then the plain trainer."""
from __future__ import annotations

import logging
import os

import torch


def threads_for(cpus_per_worker: float, threads_per_worker: int) -> int:
    """Intra-op threads: as configured, else the CPUs Ray reserved for the worker, so workers never oversubscribe."""
    return threads_per_worker or max(1, int(cpus_per_worker))


def train_worker(loop_config: dict) -> None:
    from dist_minbert.config import config_from_dict
    from dist_minbert.engine.trainer import DistContext, Trainer

    cfg = config_from_dict(loop_config["config"])
    threads = threads_for(cfg.workers.cpus_per_worker, cfg.workers.threads_per_worker)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if cfg.workers.use_gpu:
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    trainer = Trainer(cfg, DistContext.current(cfg.workers.use_gpu), report=_report_to_ray)
    trainer.fit()


def _report_to_ray(metrics: dict) -> None:
    import ray.train

    flat = {"epoch": metrics["epoch"], "step": metrics["step"], "score": metrics["score"]}
    flat.update({f"dev/{t}/{m}": v for t, ms in metrics["dev"].items() for m, v in ms.items()})
    ray.train.report(flat)
