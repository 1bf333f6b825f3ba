"""Predictions in the CS224N submission format, which its graders parse literally."""

from __future__ import annotations

from collections.abc import Sequence

import fsspec
import numpy as np

from dist_minbert.tasks.config import TaskConfig


def write_predictions(path: str, task: TaskConfig, ids: Sequence[str], preds: Sequence[float] | np.ndarray) -> None:
    """`id \\t {prediction_column} \\n`, then `{id} , {pred} \\n` per row; classes as integers, scores as floats."""
    if len(ids) != len(preds):
        raise ValueError(f"{path}: {len(ids)} ids for {len(preds)} predictions; allowed: one prediction per id")
    as_class = task.kind != "pair_regression"
    with fsspec.open(path, "w", encoding="utf-8") as out:
        out.write(f"id \t {task.prediction_column} \n")
        for row_id, pred in zip(ids, preds):
            out.write(f"{row_id} , {int(pred) if as_class else float(pred)} \n")
