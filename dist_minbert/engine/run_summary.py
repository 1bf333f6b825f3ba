"""summary.json: what a finished job reports, the same core for every job on the engine."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from dist_minbert.engine.dist_context import DistContext
from dist_minbert.engine.run_checkpoint import RunState


def write_summary(out: Path, ctx: DistContext, state: RunState, samples: int, train_s: float, started: float,
                  checkpoint: Path | None, paths: dict, **figures) -> dict:
    """The summary (rank 0 writes it to out/summary.json); `figures` and `paths` are the job's own entries.
    A metric that is NaN or infinite (a constant prediction's Pearson) is written as null: strict JSON."""
    history = state.dev_history
    summary = {
        "num_workers": ctx.world_size,
        "steps": state.global_step,
        "samples": samples,
        "samples_per_s": samples / train_s if train_s else 0.0,
        "train_s": train_s,  # the steps, data waits included
        "wall_s": time.perf_counter() - started,  # this worker: data, engine, training, evaluation
        "initial_dev": history.initial,
        "dev": history.last,
        "best_dev": history.best,
        "best_score": history.best_score if history.best else None,
        **figures,
        "paths": {"output_dir": str(out), "tensorboard": str(out / "tensorboard"), "checkpoint": str(checkpoint) if checkpoint else None,
                  "config": str(out / "config.yaml"), **paths},
    }
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2, allow_nan=False))
    return summary


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
