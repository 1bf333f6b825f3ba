"""Batched inference over a slice of a task split: the part evaluation, `evaluate` and `predict` share."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from dist_minbert.data.stream import eval_shard
from dist_minbert.data.source import RowSource, token_counts
from dist_minbert.engine.dist_context import DistContext
from dist_minbert.tasks.multitask import MultitaskModel


@torch.no_grad()
def predict_rows(forward: Callable, model: MultitaskModel, task: str, source: RowSource, num_rows: int, ctx: DistContext,
                 collate_rows: Callable[[pa.Table], dict[str, torch.Tensor]], batch_size: int,
                 values: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Predictions (label space) for this rank's contiguous share of the first `num_rows` rows, in row order.

    Rows are batched shortest first, so each batch pads to rows of its own length (about half the
    padded tokens of file order on the CS224N dev sets), then put back in row order.
    `forward` is the DeepSpeed engine in a run, or the plain model in a single process. `values` maps the
    head's outputs to what is returned per row (default `model.predict`, the label space; the analysis takes
    the class logits, one row of the array each).
    """
    shard = eval_shard(num_rows, ctx.world_size, ctx.rank)
    table = source.take_table(np.arange(shard.start, shard.stop))
    by_length = np.argsort(token_counts(table), kind="stable")
    values = values or model.predict
    was_training = model.training
    model.eval()
    preds = np.zeros(len(shard), dtype=np.float64)
    for start in range(0, len(shard), batch_size):
        chosen = by_length[start: start + batch_size]
        batch = {k: v.to(ctx.device) for k, v in collate_rows(table.take(pa.array(chosen))).items()}
        out = values(task, forward(task, batch)).double().cpu().numpy()
        if out.shape[1:] != preds.shape[1:]:  # per-row vectors: sized by the first batch
            preds = np.zeros((len(shard), *out.shape[1:]), dtype=np.float64)
        preds[chosen] = out
    model.train(was_training)
    return preds


def predict_files(model: MultitaskModel, cfg, files: list[tuple[str, str]], out: str | Path) -> list[tuple[str, str]]:
    """CS224N prediction files of (task, file) pairs into `out` as `<task>-<file stem>-output.csv`; returns
    (task, written file) pairs."""
    from dist_minbert.tasks.predictions import write_predictions

    Path(out).mkdir(parents=True, exist_ok=True)
    written = []
    for task, path in files:
        rows, preds, _ = evaluate_file(model, cfg, task, path, labelled=False)
        target = str(Path(out) / f"{task}-{Path(path).stem}-output.csv")
        write_predictions(target, cfg.tasks[task], rows.ids, preds)
        written.append((task, target))
    return written


def evaluate_file(model: MultitaskModel, cfg, task: str, path: str, labelled: bool, batch_size: int = 64,
                  values: Callable[[str, torch.Tensor], torch.Tensor] | None = None):
    """Predictions (and metrics when labelled) for any file in the CS224N format, in one process; `values` as
    for predict_rows (metrics need label-space predictions)."""
    from dist_minbert.data.collate import collator
    from dist_minbert.data.source import TableSource, tokenize_rows
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
    collate = collator(tokenizer, encoding_for(spec), cfg.model.max_length)
    preds = predict_rows(model, model, task, source, len(source), DistContext.single(),
                         lambda rows: collate(rows).tensors, batch_size, values)
    metrics = compute_metrics(spec, preds, np.asarray(rows.labels)) if labelled and values is None else {}
    return rows, preds, metrics
