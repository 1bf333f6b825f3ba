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


def evaluate_file(model: MultitaskModel, cfg, task: str, path: str, labelled: bool, batch_size: int = 64):
    """Predictions (and metrics when labelled) for any file in the CS224N format, in one process."""
    from dist_minbert.data.collate import collate
    from dist_minbert.data.source import TableSource, tokenize_rows
    from dist_minbert.engine.trainer import DistContext
    from dist_minbert.model.tokenizer import WordPieceTokenizer
    from dist_minbert.tasks.config import encoding_for
    from dist_minbert.tasks.metrics import compute_metrics
    from dist_minbert.tasks.readers import read_task_file

    if task not in cfg.tasks:
        raise ValueError(f"task {task!r} is not in this checkpoint; allowed: {', '.join(cfg.tasks)}")
    spec = cfg.tasks[task]
    tokenizer = WordPieceTokenizer.from_checkpoint(cfg.model.checkpoint)
    rows = read_task_file(path, spec, labelled=labelled, on_bad_row=cfg.data.on_bad_row)
    source = TableSource(tokenize_rows(rows, tokenizer, max_tokens=cfg.model.max_length - 1))
    encoding = encoding_for(spec)
    preds = predict_rows(model, model, task, source, len(source), DistContext(0, 1, torch.device("cpu")),
                         lambda r: collate(r, encoding, cfg.model.max_length, tokenizer.cls_id, tokenizer.sep_id,
                                           tokenizer.pad_id).tensors, batch_size)
    metrics = compute_metrics(spec, preds, np.asarray(rows.labels)) if labelled else {}
    return rows, preds, metrics
