"""Distributed dev/test evaluation and prediction files: what a run does with its model besides training.

Each rank predicts a contiguous slice of a split; rank 0 gathers the slices (one gather per task),
scores them and broadcasts the metrics, so every rank holds the same values. An evaluation returns
its predictions with its metrics: the caller keeps those of the `best` evaluation and hands them back
to `write_predictions`, which then needs no second pass over the dev sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch.distributed as dist

from dist_minbert.data.collate import Collated
from dist_minbert.engine.dist_context import DistContext
from dist_minbert.engine.inference import predict_rows
from dist_minbert.engine.task_inputs import TaskSplits
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.metrics import compute_metrics
from dist_minbert.tasks.multitask import MultitaskModel
from dist_minbert.tasks.predictions import write_predictions

Metrics = dict[str, dict[str, float]]  # task → metric → value


@dataclass(frozen=True)
class TaskPredictions:
    values: np.ndarray  # label-space predictions of every row, in file order
    rows: dict[str, list]  # the rows' ids and labels


SplitPredictions = dict[str, TaskPredictions]  # task → predictions; {} on ranks other than 0


class Evaluator:
    """Predicts and scores the tasks' dev and test splits with whatever weights the engine holds now."""

    def __init__(self, engine, model: MultitaskModel, tasks: dict[str, TaskConfig], inputs: dict[str, TaskSplits],
                 collators: dict[str, Callable[[pa.Table], Collated]], ctx: DistContext, batch_size: int,
                 dev_max_rows: int = 0) -> None:
        """`batch_size` is global (each rank takes batch_size / world size); `dev_max_rows` caps each dev set
        (0 = all rows)."""
        self.engine, self.model, self.tasks, self.inputs = engine, model, tasks, inputs
        self.collators, self.ctx = collators, ctx
        self.batch_size_per_rank = batch_size // ctx.world_size
        self.dev_max_rows = dev_max_rows

    def predict(self, split: str) -> SplitPredictions:
        """Every task's predictions on `split` (tasks without that split are left out), on rank 0."""
        results = {}
        for name, splits in self.inputs.items():
            source = splits.sources.get(split)
            if source is None:
                continue
            num_rows = min(len(source), self.dev_max_rows) if split == "dev" and self.dev_max_rows else len(source)
            local = predict_rows(self.engine, self.model, name, source, num_rows, self.ctx,
                                 lambda rows, name=name: self.collators[name](rows).tensors, self.batch_size_per_rank)
            gathered = [None] * self.ctx.world_size if self.ctx.is_main else None
            dist.gather_object(local, gathered, dst=0)
            if self.ctx.is_main:
                results[name] = TaskPredictions(np.concatenate(gathered), source.take(np.arange(num_rows)))
        return results

    def evaluate(self, split: str) -> tuple[Metrics, SplitPredictions | None]:
        """Metrics of every labelled task on `split`, identical on all ranks, and the predictions they
        score — None when the dev sets were capped, since those cannot stand for a full prediction file."""
        predictions = self.predict(split)
        metrics = [{name: compute_metrics(self.tasks[name], p.values, np.asarray(p.rows["label"]))
                    for name, p in predictions.items()} if self.ctx.is_main else None]
        dist.broadcast_object_list(metrics, src=0)
        full = not (split == "dev" and self.dev_max_rows)
        return metrics[0], predictions if full else None

    def write_predictions(self, out_dir: Path, splits: list[str],
                          known: dict[str, SplitPredictions] | None = None) -> dict[str, str]:
        """CS224N prediction files `<task>-<split>-output.csv` (rank 0 writes); returns "<task>-<split>" → path.

        `known` holds predictions already made with the current weights (the best evaluation's dev
        predictions after the best weights are loaded); other splits are predicted here. Collective.
        """
        paths = {}
        for split in splits:
            predictions = (known or {}).get(split)
            for name, p in (predictions if predictions is not None else self.predict(split)).items():
                path = out_dir / f"{name}-{split}-output.csv"
                if self.ctx.is_main:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_predictions(str(path), self.tasks[name], p.rows["id"], p.values)
                paths[f"{name}-{split}"] = str(path)
        return paths
