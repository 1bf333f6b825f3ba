"""Batched inference over a slice of a task split: the part evaluation, `evaluate` and `predict` share."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dist_minbert.data.stream import eval_shard
from dist_minbert.data.source import RowSource
from dist_minbert.tasks.multitask import MultitaskModel


@torch.no_grad()
def predict_rows(forward: Callable, model: MultitaskModel, task: str, source: RowSource, num_rows: int, ctx,
                 collate_rows: Callable[[dict[str, list]], dict[str, torch.Tensor]], batch_size: int) -> np.ndarray:
    """Predictions (label space) for this rank's contiguous share of the first `num_rows` rows.

    `forward` is the DeepSpeed engine in a run, or the plain model in a single process.
    """
    rows = eval_shard(num_rows, ctx.world_size, ctx.rank)
    was_training = model.training
    model.eval()
    preds = [np.zeros(0, dtype=np.float64)]
    for start in range(rows.start, rows.stop, batch_size):
        batch = collate_rows(source.take(np.arange(start, min(start + batch_size, rows.stop))))
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        preds.append(model.predict(task, forward(task, batch)).double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(preds)
