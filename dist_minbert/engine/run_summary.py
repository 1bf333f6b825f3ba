"""summary.json: what a finished job reports, the same core for every job on the engine."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from dist_minbert.engine.dist_context import DistContext
from dist_minbert.engine.run_checkpoint import RunState
from dist_minbert.engine.run_storage import RunStorage, is_url


def write_summary(storage: RunStorage, ctx: DistContext, state: RunState, samples: int, train_s: float,
                  started: float, checkpoint: Path | None, paths: dict, **figures) -> dict:
    """The summary (rank 0 writes it to summary.json in the run's folder); `figures` and `paths` are the job's
    own entries, paths in the run's folder given as the user finds them (URLs for a run at a URL).
    A metric that is NaN or infinite (a constant prediction's Pearson) is written as null: strict JSON."""
    history, out = state.dev_history, storage.local
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
        "paths": _located(storage, {"output_dir": out, "tensorboard": out / "tensorboard", "checkpoint": checkpoint,
                                    "config": out / "config.yaml", **paths}),
    }
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2, allow_nan=False))
    return summary


def _located(storage: RunStorage, value):
    """Every path (or path string) in `value` as storage.location gives it; None stays None."""
    if isinstance(value, dict):
        return {k: _located(storage, v) for k, v in value.items()}
    if value is None or (isinstance(value, str) and is_url(value)):
        return value
    return storage.location(Path(value))


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
