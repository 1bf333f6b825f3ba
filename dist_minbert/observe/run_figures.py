"""What a finished run reports about itself: summary.json's throughput, step-time and memory figures, and the
metrics of its row in TensorBoard's HParams view. Shared by every job on the engine."""
from __future__ import annotations

import math

import torch

from dist_minbert.observe.loss_window import LossWindow
from dist_minbert.observe.memory import gather_per_rank, peak_rss_mb
from dist_minbert.observe.timers import StepTimers


def run_figures(timers: StepTimers, window: LossWindow, train_s: float, device: torch.device | str) -> dict:
    """`tokens_per_s`: every rank's non-pad tokens over the steps' seconds (data waits included, as
    `samples_per_s`); `step_time_s`: mean seconds per step of each phase (this rank's timers: rank 0's in
    summary.json); `peak_rss_mb`: the largest peak RSS of any rank. Collective: one small all-gather."""
    per_rank = gather_per_rank([window.run_tokens, peak_rss_mb()], device)
    return {"tokens_per_s": float(per_rank[:, 0].sum()) / train_s if train_s else 0.0,
            "step_time_s": timers.run_means(), "peak_rss_mb": float(per_rank[:, 1].max())}


def hparam_metrics(summary: dict) -> dict[str, float]:
    """The HParams view's metric columns from a job's summary: the last evaluation's dev metrics
    (`hparams/dev/<task>/<metric>`), the best one's (`hparams/best_dev/...`) and score, and the run's
    throughput and peak memory. Missing and non-finite values are left out (a column the run has no value in)."""
    values = {f"hparams/{key}/{task}/{name}": value
              for key in ("dev", "best_dev") for task, metrics in (summary.get(key) or {}).items()
              for name, value in metrics.items()}
    values.update({f"hparams/{key}": summary.get(key)
                   for key in ("best_score", "samples_per_s", "tokens_per_s", "peak_rss_mb")})
    values["hparams/step_s"] = summary.get("step_time_s", {}).get("step")
    return {tag: float(v) for tag, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def run_hparams(cfg, steps: int, **job) -> dict[str, float | int | str]:
    """The hyperparameters a user compares runs by, named by their config keys, from the sections every job's
    config has (optim, deepspeed, train, workers, model); `job`: the job's own (surgery, schedule, batch sizes)."""
    return {"optim.name": cfg.optim.name, "optim.lr": cfg.optim.lr, "optim.schedule": cfg.optim.schedule,
            "optim.warmup_fraction": cfg.optim.warmup_fraction, "optim.weight_decay": cfg.optim.weight_decay,
            "deepspeed.zero_stage": cfg.deepspeed.zero_stage, "deepspeed.precision": cfg.deepspeed.precision,
            "deepspeed.gradient_accumulation_steps": cfg.deepspeed.gradient_accumulation_steps,
            "workers.num_workers": cfg.workers.num_workers, "train.seed": cfg.train.seed,
            "train.epochs": cfg.train.epochs, "steps": steps, "model.checkpoint": cfg.model.checkpoint,
            "model.max_length": cfg.model.max_length, "model.dropout": cfg.model.dropout, **job}
